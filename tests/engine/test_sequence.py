"""Sequence bookkeeping, and the engine core's promise to import no torch."""

import subprocess
import sys

import pytest

from nanoseek.engine.sequence import Sequence, SequenceStatus


def test_prompt_and_output_split():
    seq = Sequence("r", [5, 6, 7])
    assert seq.num_prompt_tokens == 3 and seq.status is SequenceStatus.WAITING
    seq.append_token(9)
    seq.append_token(10)
    assert seq.prompt_token_ids == [5, 6, 7]
    assert seq.output_token_ids == [9, 10]
    assert seq.num_output_tokens == 2 and len(seq) == 5
    seq.num_computed_tokens = 4
    assert seq.num_uncomputed_tokens == 1


def test_token_ids_are_copied():
    prompt = [1, 2]
    seq = Sequence("r", prompt)
    seq.append_token(3)
    assert prompt == [1, 2]


def test_finish_reasons_are_checked():
    seq = Sequence("r", [1])
    with pytest.raises(ValueError, match="'done' is not one of"):
        seq.mark_finished("done")
    seq.mark_finished("stop", 2)
    assert seq.is_finished and seq.finish_reason == "stop" and seq.stop_reason == 2


def test_bad_prompt_length_is_named():
    with pytest.raises(ValueError, match=r"num_prompt_tokens=4 must be in \[0, len\(token_ids\)=2\]"):
        Sequence("r", [1, 2], num_prompt_tokens=4)


def test_core_modules_import_no_torch():
    code = ("import sys, nanoseek.engine.sequence, nanoseek.engine.block_manager, "
            "nanoseek.engine.scheduler, nanoseek.engine.detokenize; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
