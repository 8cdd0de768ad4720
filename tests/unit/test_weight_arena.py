"""layers/weight_arena.compact: the model's weights in one allocation, same values, same views."""

from __future__ import annotations

import torch

from llcuda.kernels.quant_pack import PackedWeight
from llcuda.layers.weight_arena import compact, model_tensors


class _Owner:  # an owner in an llcuda module, as models and layers are
    pass


_Owner.__module__ = "llcuda.test"


def test_tensors_move_into_one_arena_keeping_values_and_views():
    m = _Owner()
    base = torch.arange(40, dtype=torch.float32)
    m.a, m.b = base[5:15], base.view(5, 8)[:, 2]  # two views of one storage, one strided
    m.c = torch.arange(7, dtype=torch.int16)
    m.w = PackedWeight(1, 2, 32, qs=torch.arange(64, dtype=torch.uint8).view(2, 32))  # frozen
    m.layers = [m.w, {"loose": torch.ones(3)}]  # a tensor straight in a container is not owned
    before = {name: getattr(m, name).clone() for name in "abc"}
    assert len(model_tensors(m, torch.device("cpu"))) == 4
    # storages: 160 + 14 + 64 bytes, each rounded up to 256
    assert compact(m, "cpu") == 3 * 256
    for name in "abc":
        assert torch.equal(getattr(m, name), before[name]), name
    arena = m.a.untyped_storage().data_ptr()
    assert m.b.untyped_storage().data_ptr() == m.c.untyped_storage().data_ptr() == arena
    assert m.w.qs.untyped_storage().data_ptr() == arena and m.layers[0] is m.w
    m.a[0] = -1  # the views still share their storage; the original is left alone
    assert m.b[0] == 2 and base[5] == 5
    assert compact(_Owner(), "cpu") == 0


def test_a_compacted_model_computes_the_same(tmp_path):
    from llcuda.config import EngineConfig
    from llcuda.engine.loader import load
    from llcuda.gguf.synthetic import TINY, write_gemma3_gguf
    from llcuda.sampling_params import SamplingParams

    path = write_gemma3_gguf(tmp_path / "tiny.gguf", **TINY, seed=4)
    config = EngineConfig(ctx_size=64, device="cpu", gpu_layers=0)
    loaded = load(str(path), config, verbose=False)
    try:
        engine = loaded.llm_engine
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        want = engine.generate([[5, 300, 301, 302]], params)[0].new_token_ids
        assert compact(engine.model_runner.model, "cpu") > 0
        assert engine.generate([[5, 300, 301, 302]], params)[0].new_token_ids == want
    finally:
        loaded.close()
