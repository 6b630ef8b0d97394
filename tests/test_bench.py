"""`kakeya bench`: every codec at its usual settings, ratios from real bytes, contract fields."""

from __future__ import annotations

import json

import pytest

from kakeyaturbo import codecs
from kakeyaturbo.bench import kakeya_grid, measure, measure_many, synthetic_kv
from kakeyaturbo.cli import main


def test_bench_all_codecs_writes_contract_fields(tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--codec", "all", "--dims", "64", "--streams", "2", "--tokens", "128", "--repeats", "1",
               "--json", str(out), "--markdown", str(tmp_path / "bench.md")])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert {r["codec"] for r in rows} == set(codecs.names())
    for r in rows:
        assert {"codec", "config", "device", "shape", "ratio", "rel_mse", "encode_mb_s", "decode_mb_s"} <= set(r)
        assert r["ratio"] == pytest.approx(16 / r["bits_per_element"])  # both from the stored bytes
        assert r["rel_mse"] < 1.0 and r["encode_mb_s"] > 0
    assert "| kakeya-v2 |" in (tmp_path / "bench.md").read_text()


def test_kakeya_grid_and_synthetic_draws():
    assert len(kakeya_grid(64)) == 12 and {c["pca"] for c in kakeya_grid(64)} == {"exact", "randomized"}
    a, b = synthetic_kv(2, 64, 16), synthetic_kv(2, 64, 16, sample_seed=9)
    assert a.shape == (2, 64, 16) and not a.equal(b)


@pytest.mark.model
def test_bench_captured_fits_calibrated_codecs_on_calibration_text(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--codec", "kakeya-v2", "--data", "captured", "--tokens", "64", "--repeats", "1",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["settings"]["stream"], r["settings"]["coding"]) for r in rows} == {
        (s, c) for s in ("k", "v") for c in ("fixed", "entropy")}
    assert all(r["shape"] == [90, 64, 64] and r["rel_mse"] < 1.0 for r in rows)
    assert main(["bench", "--codec", "kakeya-v2", "--data", "captured", "--layout", "joint", "--tokens", "64",
                 "--repeats", "1", "--json", str(out)]) == 0
    assert all(r["shape"] == [30, 64, 192] and r["rel_mse"] < 1.0 for r in json.loads(out.read_text()))


def test_bench_recipes_measure_k_and_v_on_the_engine_input(tmp_path):
    out = tmp_path / "speed.json"
    assert main(["bench", "--recipe", "kakeya-max", "--recipe", "kivi-2", "--chunks", "2", "--kv-heads", "2",
                 "--head-dim", "16", "--repeats", "1", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["settings"]["recipe"], r["settings"]["stream"]) for r in rows] == [
        ("kakeya-max", "k"), ("kakeya-max", "v"), ("kivi-2", "k"), ("kivi-2", "v")]
    v2 = rows[0]
    assert v2["codec"] == "kakeya-v2" and v2["shape"] == [1, 2, 64, 32]  # joint rows: 2 chunks of 64 tokens
    assert v2["config"]["head_gain_bits"] == 4 and v2["config"]["reflector_bits"] == 4
    assert rows[2]["shape"] == [1, 2, 2, 32, 16] and all(r["rel_mse"] < 1.0 and r["decode_mb_s"] > 0 for r in rows)


def test_bench_of_a_cross_layer_recipe_codes_the_groups_rows(tmp_path):
    out = tmp_path / "speed.json"
    assert main(["bench", "--recipe", "kakeya-1.5b-group2-uniform", "--chunks", "1", "--kv-heads", "2",
                 "--head-dim", "16", "--repeats", "1", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["shape"] for r in rows] == [[1, 1, 64, 64]] * 2  # 2 layers x 2 KV heads x D 16 per row
    assert all(r["rel_mse"] < 1.0 for r in rows)


class _Counting:
    """A codec wrapper that logs which codec each encode/decode call reached, in order."""

    def __init__(self, codec, tag, log):
        self.codec, self.tag, self.log = codec, tag, log
        self.name, self.config = codec.name, codec.config

    def encode(self, x):
        self.log.append((self.tag, "encode"))
        return self.codec.encode(x)

    def decode(self, enc):
        self.log.append((self.tag, "decode"))
        return self.codec.decode(enc)


def test_measure_many_times_the_rows_round_robin():
    log: list[tuple[str, str]] = []
    x = synthetic_kv(2, 64, 16)
    jobs = [(_Counting(codecs.get("fp8"), "a", log), x), (_Counting(codecs.get("kivi", bits=4), "b", log), x)]
    rows = measure_many(jobs, repeats=3)
    timed = log[4:]  # after each job's quality encode/decode
    assert timed == [(t, op) for _ in range(3) for t in ("a", "b") for op in ("encode", "encode", "decode", "decode")]
    single = measure(jobs[1][0], x, repeats=1)
    assert rows[1]["ratio"] == single["ratio"] and rows[1]["rel_mse"] == single["rel_mse"]
    assert all(r["encode_mb_s"] > 0 and r["decode_mb_s"] > 0 for r in rows)


@pytest.mark.parametrize("arg", ["--repeats", "--chunks", "--kv-heads", "--head-dim", "--threads", "--tokens",
                                 "--streams", "--dims"])
def test_bench_refuses_sizes_below_one(arg, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--recipe", "fp8", arg, "0"])
    assert e.value.code != 0 and f"{arg}: must be at least 1" in capsys.readouterr().err
