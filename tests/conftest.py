from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter, which must be chosen before triton.language is first
# imported (transformers' model code imports it through torch._dynamo), hence before the imports below.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers.generation.streamers import BaseStreamer  # noqa: E402

from reroute.testing import TINY_CONFIGS, tiny_model  # noqa: E402

FAMILIES = sorted(TINY_CONFIGS)

# tiny models run fastest on one thread, and CI has two cores for everything
torch.set_num_threads(1)


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def model(family: str) -> torch.nn.Module:
    return tiny_model(family)


@pytest.fixture
def tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, 96, (2, 9), generator=generator)


def capture_router_inputs(rm) -> tuple[dict[int, torch.Tensor], list]:
    """Forward pre-hooks recording each MoE layer's router input ``[T, H]`` (last call wins)."""
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for idx, layer in rm.layers.items():

        def hook(module, args, idx=idx):
            inputs[idx] = args[0].detach().reshape(-1, args[0].shape[-1])

        handles.append(layer.router.register_forward_pre_hook(hook))
    return inputs, handles


class Collect(BaseStreamer):
    """A streamer that keeps what it is given."""

    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ended += 1


def random_mc_items(n: int, seed: int, length: int) -> list[dict]:
    """``n`` multiple-choice items over the tiny vocabulary: a prompt of ``length`` words, four one-word choices."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = [f"w{int(t)}" for t in torch.randint(3, 96, (length,), generator=gen)]
        choices = [f" w{int(t)}" for t in torch.randperm(90, generator=gen)[:4] + 3]
        out.append({"prompt": " ".join(words), "choices": choices, "label": i % 4})
    return out


@pytest.fixture
def fresh_dynamo():
    """A test that counts compiled graphs starts and ends with dynamo's caches and counters empty."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
