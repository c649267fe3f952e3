"""Multi-teacher: caches of several teachers over one token stream, combined per position."""

import numpy as np
import pytest
from conftest import make_model, tiny_overrides

from mlxdistill import api
from mlxdistill import cache as cache_mod
from mlxdistill.config import ConfigError, load_config
from mlxdistill.multi import combine
from mlxdistill.shards import CacheError


def test_weighted_mixture_of_topk_by_hand():
    a = {"ids": np.array([[[1, 2]]]), "logprobs": np.log(np.array([[[0.5, 0.3]]]))}
    b = {"ids": np.array([[[2, 3]]]), "logprobs": np.log(np.array([[[0.6, 0.2]]]))}
    out = combine([a, b], [0.25, 0.75])
    got = dict(zip(out["ids"][0, 0].tolist(),
                   np.exp(out["logprobs"][0, 0].astype(np.float64)).tolist()))
    assert got[1] == pytest.approx(0.125, abs=1e-3)
    assert got[2] == pytest.approx(0.25 * 0.3 + 0.75 * 0.6, abs=1e-3)
    assert got[3] == pytest.approx(0.15, abs=1e-3)
    # the merged slots hold each id once; the rest is the mixture's tail (0.25*.2 + .75*.2)
    assert sum(v for v in got.values()) == pytest.approx(0.8, abs=2e-3)


def test_sampled_mixture_and_confidence_pick():
    a = {"ids": np.array([[[4, 5, 0, 0]]]), "counts": np.array([[[3, 1, 0, 0]]], np.uint8)}
    b = {"ids": np.array([[[5, 0, 0, 0]]]), "counts": np.array([[[4, 0, 0, 0]]], np.uint8)}
    out = combine([a, b], [0.5, 0.5])
    w = dict(zip(out["ids"][0, 0].tolist(), out["counts"][0, 0].tolist()))
    assert w[4] == pytest.approx(0.375) and w[5] == pytest.approx(0.625)
    conf = combine([a, b], [0.5, 0.5], mode="confidence")  # b is sure of id 5
    assert conf["ids"][0, 0, 0] == 5 and conf["counts"][0, 0, 0] == pytest.approx(1.0)


def test_two_teachers_end_to_end_and_mismatch_refused(tiny, tmp_path):
    other = make_model(str(tmp_path / "teacher2"), dim=48, layers=2, seed=9, sharpen=4.0)
    base = tiny_overrides(tiny, tmp_path, **{"train.iters": 4})
    second = load_config(None, base + [f"teacher.model={other}",
                                       f"cache.dir={tmp_path / 'cache2'}"])
    cache_mod.build(second, quiet=True, log=lambda m: None)
    cfg = load_config(None, base + [f"cache.mix=[{tmp_path / 'cache2'}]",
                                    "cache.mix_weights=[0.7, 0.3]"])
    logs = []
    res = api.train(cfg, quiet=True, log=logs.append)
    assert any("multi-teacher: 2 caches" in m for m in logs)
    assert np.isfinite(res["student_after"]["kl"])

    wrong = load_config(None, base + [f"teacher.model={other}", "data.seq_len=16",
                                      f"cache.dir={tmp_path / 'cache3'}"])
    cache_mod.build(wrong, quiet=True, log=lambda m: None)
    bad = load_config(None, base + [f"cache.mix=[{tmp_path / 'cache3'}]",
                                    f"run.dir={tmp_path / 'run_bad'}"])
    with pytest.raises(CacheError, match="seq_len"):
        api.train(bad, quiet=True, log=lambda m: None)
    with pytest.raises(ConfigError, match="one per"):
        load_config(None, ["cache.mix=[a]", "cache.mix_weights=[1, 2, 3]"])
