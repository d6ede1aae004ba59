"""Incremental detokenization with stop strings (no torch): token ids in, text deltas out.

    detok = IncrementalDetokenizer(lambda ids: tok.decode(ids, skip_special_tokens=True),
                                   prompt_ids, stop=["\\n\\n"])
    for token in generated:
        print(detok.add(token), end="")   # "" while a character or a possible stop string is pending
        if detok.stop_reason is not None:  # a stop string appeared: tell the scheduler, finish(id, "stop")
            break
    print(detok.flush(), end="")          # at the end: whatever was held back
    detok.text                            # everything emitted

A byte-level BPE token can end in the middle of a UTF-8 character; decoding it alone gives U+FFFD,
so text is only released once the decoded tail is a whole character. Each step decodes a short
window (a few tokens before the last release point) rather than the whole output, like vLLM's
prefix/read offsets. Text that could still grow into a stop string is held back, so a stop string
never leaks into the output, also when it spans several tokens; the output ends right before it.
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # tokens before the read offset decoded along, so merges and spaces come out right
MAX_UTF8_BYTES = 4


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: Sequence[int] = (),
                 stop: Sequence[str] = ()):
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop={list(stop)!r} must be a list of non-empty strings")
        self._decode = decode
        self.stop = list(stop)
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._ids = list(prompt_ids)[-CONTEXT_TOKENS:]
        self._prefix = 0
        self._read = len(self._ids)
        # A prompt that ends inside a character: its first bytes belong to the first output char.
        while self._read > 0 and self._decode(self._ids[:self._read]).endswith(REPLACEMENT) \
                and len(self._ids) - self._read < MAX_UTF8_BYTES - 1:
            self._read -= 1
        self._pending = ""      # decoded text not yet released
        self.text = ""          # text released so far
        self.token_ids: list[int] = []
        self.stop_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.stop_reason is not None

    def add(self, token_id: int) -> str:
        """Feed one generated token; returns the text that became safe to show (maybe "")."""
        if self.finished:
            return ""
        self.token_ids.append(int(token_id))
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self._pending += new_text[len(prefix_text):]
            # The tokens just released become the context of the next window; older ones are
            # never decoded again.
            self._ids = self._ids[self._read:]
            self._prefix, self._read = 0, len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The sequence ended: release what was held (an unfinished character decodes as U+FFFD)."""
        if self.finished:
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text):
            self._pending += new_text[len(prefix_text):]
        self._prefix = self._read = len(self._ids)
        return self._release(final=True)

    # ------------------------------------------------------------------ internals
    def _release(self, final: bool) -> str:
        if not self.stop:
            out, self._pending = self._pending, ""
            self.text += out
            return out
        # A match can start in the last (max_stop - 1) released chars only if it did not fit before,
        # and released text never holds a stop string's beginning, so search the pending text.
        hit = find_first_stop(self._pending, self.stop)
        if hit is not None:
            idx, s = hit
            out = self._pending[:idx]
            self._pending = ""
            self.text += out
            self.stop_reason = s
            return out
        hold = 0 if final else held_suffix_len(self._pending, self.stop)
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        self.text += out
        return out


def find_first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(index, stop string) of the earliest stop string in text, or None."""
    best = None
    for s in stops:
        i = text.find(s)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best


def held_suffix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest
