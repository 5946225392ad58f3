"""Target loading helpers: dtype names and the CPU's fastest dtype."""

import pytest
import torch

from dspark_hf.targets import fastest_cpu_dtype, parse_dtype


def test_parse_dtype_names_aliases_and_dtypes():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    assert parse_dtype(None) == parse_dtype("auto") == "auto"
    assert parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="Unknown dtype 'int9'"):
        parse_dtype("int9")


def test_fastest_cpu_dtype_picks_the_faster_matmul(monkeypatch):
    """bf16 only where its matmul beats float32; the timing is the decision, so fake the clock per dtype."""
    assert fastest_cpu_dtype(rows=8, width=16) in (torch.bfloat16, torch.float32)
    for slow, expected in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)):
        real_matmul = torch.Tensor.__matmul__
        clock = {"t": 0.0}

        def matmul(a, b, slow=slow, clock=clock, real_matmul=real_matmul):
            clock["t"] += 1.0 if a.dtype == slow else 0.1
            return real_matmul(a, b)

        monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
        monkeypatch.setattr("time.perf_counter", lambda clock=clock: clock["t"])
        assert fastest_cpu_dtype(rows=8, width=16) is expected
        monkeypatch.undo()
