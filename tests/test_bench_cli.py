"""Smoke tests of ``mmrprune-bench speed`` on tiny shapes (no timing asserts)."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmrprune import dispatch
from mmrprune.backends import Backend
from mmrprune.bench import cli, plotting, speed
from mmrprune.bench.records import REQUIRED_FIELDS, SPEED_FIELDS, format_table

TINY = ["--tokens", "64", "--dim", "16", "--batch", "2", "--k", "8", "--repeats", "2", "--quiet"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_speed_json_has_every_field_and_sane_values(tmp_path, capsys):
    path = tmp_path / "out.json"
    argv = TINY + ["--backend", "torch,numpy,anchor", "--method", "mmr,divprune,topk", "--json", str(path)]
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    records = json.loads(path.read_text())
    # anchor has no topk: 3 backends x 3 methods - 1
    assert sorted((r["backend"], r["method"]) for r in records) == sorted(
        [(b, m) for b in ("torch", "numpy", "anchor") for m in ("mmr", "divprune", "topk")
         if not (b == "anchor" and m == "topk")])
    for r in records:
        missing = [f for f in SPEED_FIELDS if f not in r]
        assert not missing, missing
        assert (r["batch"], r["tokens"], r["dim"], r["k"], r["lam"], r["dtype"]) == (2, 64, 16, 8, 0.5, "float16")
        assert r["device"] and isinstance(r["device"], str)
        assert r["torch"] == torch.__version__
        assert "--tokens 64" in r["command"] and r["command"].startswith("mmrprune-bench")
        assert r["commit"]
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["us_per_step"] == pytest.approx(r["median_ms"] * 1e3 / 8)
        assert r["images_per_s"] == pytest.approx(2 / (r["median_ms"] * 1e-3))
        assert r["speedup_vs_torch"] > 0
        if r["backend"] == "torch":
            assert r["speedup_vs_torch"] == pytest.approx(1.0)
        if r["method"] == "topk":
            assert r["speedup_vs_anchor"] is None
        else:
            assert r["speedup_vs_anchor"] > 0
            if r["backend"] == "anchor":
                assert r["speedup_vs_anchor"] == pytest.approx(1.0)
    assert "skipped: anchor topk custom" in out
    for header in ("backend", "median ms", "us/step", "x torch", "x anchor"):
        assert header in out


def test_explicit_speed_subcommand_writes_csv(tmp_path, capsys):
    path = tmp_path / "out.csv"
    rc, out, err = _run(["speed"] + TINY + ["--backend", "torch", "--method", "mmr", "--dtype", "float32,float16",
                                             "--csv", str(path)], capsys)
    assert rc == 0, err
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["dtype"] for r in rows] == ["float32", "float16"]
    assert list(rows[0])[:len(REQUIRED_FIELDS)] == list(REQUIRED_FIELDS)
    assert float(rows[0]["median_ms"]) > 0


def test_unavailable_and_broken_backends_are_skipped(monkeypatch, tmp_path, capsys):
    real_status, real_load = dispatch.status, dispatch.load

    def boom(batch):
        raise ZeroDivisionError("kernel exploded")

    broken = Backend(name="triton", methods=("mmr",), device_types=("cpu",), select=boom,
                     status=lambda: (True, "fake"))
    monkeypatch.setattr(dispatch, "status",
                        lambda name: (False, "no GPU in this test") if name == "cuda"
                        else (True, "fake") if name == "triton" else real_status(name))
    monkeypatch.setattr(dispatch, "load", lambda name: (broken, "") if name == "triton" else real_load(name))
    path = tmp_path / "out.json"
    rc, out, err = _run(TINY + ["--backend", "cuda,triton,torch", "--method", "mmr,divprune", "--device", "cpu",
                                "--json", str(path)], capsys)
    assert rc == 0
    assert "Traceback" not in out + err
    assert "skipped: cuda: no GPU in this test" in out
    assert "skipped: triton mmr custom float16: failed: " in out  # whatever it raised, reported in one line
    assert "skipped: triton divprune custom: backend 'triton' does not implement method 'divprune'" in out
    assert {r["backend"] for r in json.loads(path.read_text())} == {"torch"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_backends_skipped_without_traceback_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "mmrprune.bench"] + TINY + ["--backend", "cuda,triton,torch",
                                                                           "--method", "topk"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "skipped: cuda:" in proc.stdout and "skipped: triton:" in proc.stdout
    assert "torch    topk" in proc.stdout


@pytest.mark.parametrize("args", [["--help"], ["speed", "--help"], ["quality", "--help"]])
def test_module_help(args):
    proc = subprocess.run([sys.executable, "-m", "mmrprune.bench"] + args, capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    if args == ["--help"]:
        assert "speed" in proc.stdout and "quality" in proc.stdout and "dinov2" in proc.stdout


@pytest.mark.parametrize("bad", [["--preset", "nope"], ["--method", "mmr,bogus"], ["--lam", "1.5"],
                                 ["--k", "4", "--keep-ratio", "0.5"], ["--preset", "dinov2", "--batch", "9"],
                                 ["--tokens", "2000"], ["--keep-ratio", "0"]])
def test_bad_arguments_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(bad)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_dinov2_preset_uses_the_real_tokens(capsys, tmp_path):
    path = tmp_path / "d.json"
    rc, out, err = _run(["--preset", "dinov2", "--batch", "1", "--tokens", "64", "--dim", "32", "--k", "4",
                         "--repeats", "1", "--backend", "torch", "--method", "topk", "--quiet", "--json", str(path)],
                        capsys)
    assert rc == 0, err
    (r,) = json.loads(path.read_text())
    assert (r["preset"], r["batch"], r["tokens"], r["dim"], r["k"]) == ("dinov2", 1, 64, 32, 4)
    x, w = speed.make_inputs(speed.make_shapes(["dinov2"], 1, 64, 32)[0], torch.float32, "cpu")
    from mmrprune.data import load_dinov2
    d = load_dinov2()
    assert torch.equal(x, torch.from_numpy(d["tokens"][:1, :64, :32]).float())
    assert torch.equal(w, torch.from_numpy(d["cls_attention"][:1, :64]))


def test_plot_and_missing_matplotlib(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    png = tmp_path / "s.png"
    rc, out, err = _run(TINY + ["--backend", "torch,anchor", "--method", "mmr", "--plot", str(png)], capsys)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def missing():
        raise plotting.PlotUnavailable(plotting.MISSING)
    monkeypatch.setattr(plotting, "_pyplot", missing)
    rc, out, err = _run(TINY + ["--backend", "torch", "--method", "topk", "--plot", str(tmp_path / "t.png")], capsys)
    assert rc == 1
    assert "pip install matplotlib" in err and "Traceback" not in err
    assert not (tmp_path / "t.png").exists()


def test_sweep_draws_the_inputs_once_per_shape_and_dtype(monkeypatch):
    """Every method and backend of a shape and dtype times the same inputs, made once (a CPU draw
    of a GPU target shape took seconds a case)."""
    made = []
    real = speed.make_inputs

    def counted(shape, dtype, device, seed=0):
        made.append((shape.name, dtype))
        return real(shape, dtype, device, seed)
    monkeypatch.setattr(speed, "make_inputs", counted)
    shapes = [speed.Shape("a", 1, 24, 4, "random"), speed.Shape("b", 2, 16, 4, "random")]
    cfg = speed.Config(shapes=shapes, methods=["mmr", "topk"], backends=["torch", "numpy"],
                       dtypes=["float32", "float16"], repeats=1, warmup=0)
    records, skipped = speed.run_sweep(cfg, {"device": "cpu"}, quiet=True)
    assert len(records) == 16 and not skipped
    assert made == [(s, dt) for s in ("a", "b") for dt in (torch.float32, torch.float16)]


def test_random_inputs_on_cpu_are_the_seeded_cpu_draw():
    """The committed CPU records' random features: torch's CPU generator, float32, then cast."""
    x, w = speed.make_inputs(speed.Shape("c", 2, 10, 3, "random"), torch.float16, "cpu", seed=5)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(x, torch.randn(2, 10, 3, generator=g).half()) and torch.equal(w, torch.rand(2, 10, generator=g))


def test_cpu_timer_respects_repeat_floor_and_budget():
    calls = []
    t = speed.time_cpu(lambda: calls.append(1), repeats=10, warmup=2, max_seconds=0.0)
    assert t["repeats"] == 3 and len(calls) == 2 + 3
    t = speed.time_cpu(lambda: calls.append(1), repeats=5, warmup=0, max_seconds=1e9)
    assert t["repeats"] == 5
    assert t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]


def test_add_speedups_divides_baseline_by_case():
    base = dict(device="d", preset="p", batch=1, tokens=8, dim=4, dtype="float32", k=2, lam=0.5)
    recs = [dict(base, backend="torch", method="mmr", median_ms=10.0),
            dict(base, backend="anchor", method="mmr", median_ms=40.0),
            dict(base, backend="cpu", method="mmr", median_ms=2.0),
            dict(base, backend="cpu", method="topk", median_ms=1.0),
            dict(base, backend="cpu", method="mmr", median_ms=5.0, dtype="float16")]
    speed.add_speedups(recs)
    assert recs[2]["speedup_vs_torch"] == pytest.approx(5.0)
    assert recs[2]["speedup_vs_anchor"] == pytest.approx(20.0)
    assert recs[0]["speedup_vs_anchor"] == pytest.approx(4.0)
    assert recs[3]["speedup_vs_torch"] is None and recs[3]["speedup_vs_anchor"] is None
    assert recs[4]["speedup_vs_torch"] is None  # other dtype: no baseline


def test_peak_table():
    assert speed.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert speed.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert speed.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert speed.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert speed.peak_bf16_tflops("NVIDIA GeForce RTX 3090") is None
    assert speed.peak_bf16_tflops("NVIDIA H100 NVL") is None


def test_format_table_aligns_columns():
    text = format_table([{"a": "x", "b": 1.5}, {"a": "longer", "b": 12345.0}], [("name", "a"), ("value", "b")])
    lines = text.splitlines()
    assert lines[0].startswith("name  ") and lines[2].endswith("1.50") and lines[3].endswith("12,345")
    assert len(lines[2]) == len(lines[3])


# ----------------------------------------------------------------------------- rounds and --data
def _npz(tmp_path, **arrays):
    path = tmp_path / "tokens.npz"
    np.savez(path, **arrays)
    return str(path)


def test_speed_reports_rounds_only_where_the_backend_counts(tmp_path, capsys):
    path = tmp_path / "out.json"
    rc, out, err = _run(TINY + ["--backend", "numpy,torch", "--method", "mmr", "--json", str(path)], capsys)
    assert rc == 0, err
    by = {r["backend"]: r for r in json.loads(path.read_text())}
    assert "rounds" not in by["torch"] and "rounds_per_k" not in by["torch"]   # absent, not guessed
    assert 1 <= by["numpy"]["rounds"] <= 8
    assert by["numpy"]["rounds_per_k"] == pytest.approx(by["numpy"]["rounds"] / 8)
    assert "rounds/k" in out


def test_speed_data_file_benchmarks_user_tokens(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = _npz(tmp_path, features=rng.standard_normal((2, 30, 8)).astype(np.float32),
                importance=rng.random((2, 30)).astype(np.float32), lengths=np.array([30, 11]))
    path = tmp_path / "out.json"
    rc, out, err = _run(["--data", data, "--k", "6", "--backend", "numpy,torch", "--method", "mmr", "--repeats", "2",
                         "--quiet", "--json", str(path)], capsys)
    assert rc == 0, err
    records = json.loads(path.read_text())
    assert {(r["preset"], r["batch"], r["tokens"], r["dim"]) for r in records} == {("data", 2, 30, 8)}
    # the numpy backend's picks on these tokens equal the reference's, so the file really was used
    assert next(r for r in records if r["backend"] == "numpy")["rounds"] >= 1


@pytest.mark.parametrize("arrays,message", [
    ({"tokens": np.zeros((1, 4, 2), np.float32), "w": np.zeros((1, 4))},
     "no array named 'features': found 'tokens' (float32 [1, 4, 2]), 'w' (float64 [1, 4]); --data reads"),
    ({"tokens": np.zeros((4, 2), np.float32)}, "'tokens' (the file's only array, read as the features) must be"),
    ({"features": np.zeros((4, 2), np.float32)}, "'features' must be a float array [B, N, D]"),
    ({"features": np.zeros((1, 4, 2), np.int32)}, "'features' must be a float array"),
    ({"features": np.zeros((2, 4, 2), np.float32), "importance": np.zeros((2, 5))}, "'importance' must be"),
    ({"features": np.zeros((2, 4, 2), np.float32), "lengths": np.array([4])}, "'lengths' must be an integer array [B]"),
    ({"features": np.zeros((2, 4, 2), np.float32), "lengths": np.array([4, 9])}, "'lengths' must lie in 0 .. N = 4"),
])
def test_speed_data_file_errors_name_the_array(tmp_path, capsys, arrays, message):
    data = _npz(tmp_path, **arrays)
    with pytest.raises(SystemExit):
        cli.main(["--data", data, "--backend", "torch", "--quiet"])
    err = capsys.readouterr().err
    assert message in err and data in err, err


@pytest.mark.parametrize("name", ["arr_0", "feats"])
def test_speed_data_file_with_one_array_of_another_name(tmp_path, capsys, name):
    """np.savez(path, x) names its array arr_0; a file of one array can only hold the features."""
    path = tmp_path / "tokens.npz"
    x = np.random.default_rng(0).standard_normal((2, 30, 8)).astype(np.float32)
    np.savez(path, x) if name == "arr_0" else np.savez(path, **{name: x})
    rc, out, err = _data_run(path, capsys)
    assert rc == 0, err
    assert f"its only array, '{name}', read as the features" in err
    from mmrprune.bench.token_file import read_token_file
    assert read_token_file(str(path)).features.shape == (2, 30, 8)


def _data_run(path, capsys, *extra):
    rc = cli.main(["--data", str(path), "--k", "4", "--backend", "numpy,torch", "--method", "mmr", "--repeats", "1",
                   "--quiet", *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _refused(path, capsys, *extra):
    """The run exits 2 with one error line naming the file; returns that line."""
    with pytest.raises(SystemExit) as exc:
        _data_run(path, capsys, *extra)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("mmrprune-bench: error: --data " + str(path) + ": "), err
    return line


def test_data_file_without_importance_runs_every_backend(tmp_path, capsys):
    data = _npz(tmp_path, features=np.random.default_rng(0).standard_normal((2, 16, 4)).astype(np.float32))
    path = tmp_path / "out.json"
    rc, out, err = _data_run(data, capsys, "--json", str(path))
    assert rc == 0, out + err
    assert sorted(r["backend"] for r in json.loads(path.read_text())) == ["numpy", "torch"]
    assert "failed" not in out + err


def test_data_file_dtype_is_the_files_unless_given(tmp_path, capsys):
    data = _npz(tmp_path, features=np.random.default_rng(0).standard_normal((1, 16, 4)).astype(np.float32))
    path = tmp_path / "out.json"
    rc, out, err = _data_run(data, capsys, "--json", str(path))
    assert rc == 0, err
    assert {r["dtype"] for r in json.loads(path.read_text())} == {"float32"}
    assert "dtype: float32, the file's" in out
    rc, out, err = _data_run(data, capsys, "--json", str(path), "--dtype", "float16")
    assert rc == 0, err
    assert {r["dtype"] for r in json.loads(path.read_text())} == {"float16"} and "the file's" not in out


def test_data_file_unknown_arrays_are_named_with_the_accepted_ones(tmp_path, capsys):
    data = _npz(tmp_path, features=np.ones((1, 8, 2), np.float32), weights=np.ones((1, 8)), extra=np.ones(3))
    rc, out, err = _data_run(data, capsys)
    assert rc == 0, err
    assert "ignoring array(s) ['extra', 'weights']" in err
    assert "accepted: features (float16/32/64 [B, N, D]), importance (numeric [B, N], optional), lengths" in err


def test_data_file_in_big_endian_is_benchmarked_as_the_native_one(tmp_path, capsys):
    from mmrprune.bench.token_file import read_token_file
    x = np.random.default_rng(1).standard_normal((2, 16, 4)).astype(np.float32)
    w = np.random.default_rng(2).random((2, 16))
    native = read_token_file(_npz(tmp_path, features=x, importance=w, lengths=np.array([16, 9])))
    swapped = read_token_file(_npz(tmp_path, features=x.astype(">f4"), importance=w.astype(">f8"),
                                   lengths=np.array([16, 9], dtype=">i8")))
    for a, b in zip((native.features, native.importance, native.lengths),
                    (swapped.features, swapped.importance, swapped.lengths)):
        assert b.dtype.isnative and np.array_equal(a, b)
    rc, out, err = _data_run(tmp_path / "tokens.npz", capsys)
    assert rc == 0 and "failed" not in out + err, out + err


def _zip(path, members):
    import zipfile
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _npy_bytes(array=None, header=None):
    import io
    buf = io.BytesIO()
    if header is None:
        np.save(buf, array)
    else:
        np.lib.format.write_array_header_1_0(buf, header)
        buf.write(b"\0" * 64)
    return buf.getvalue()


def test_data_file_npy_instead_of_npz_says_what_to_save(tmp_path, capsys):
    path = tmp_path / "tok.npy"
    np.save(path, np.zeros((1, 4, 2), np.float32))
    line = _refused(path, capsys)
    assert "single .npy array" in line and "numpy.savez(path, features=" in line and "lengths" in line


@pytest.mark.parametrize("case,message", [
    ("empty", "the file is empty"),
    ("text", "not an .npz archive"),
    ("member without .npy", "archive member(s) ['features'] are not .npy arrays"),
    ("truncated", "not a readable .npz (zip) archive"),
    ("bad crc", "'features' cannot be read (Bad CRC-32"),
    ("header of 3.55 PiB", "declares float32 [1000000, 1000000, 1000] = 4,000,000,000,000,000 bytes, "
                           "but the file holds 64 bytes"),
    ("float128", "'features' is float128 (16 bytes per value), which torch cannot hold"),
    ("objects", "'features' holds Python objects"),
    ("bad header", "'features' has no valid .npy header"),
])
def test_malformed_data_files_are_one_clear_line(tmp_path, capsys, case, message):
    path = tmp_path / "tokens.npz"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("features,importance\n1,2\n")
    elif case == "member without .npy":
        _zip(path, {"features": _npy_bytes(np.zeros((1, 4, 2), np.float32))})
    elif case == "truncated":
        np.savez(path, features=np.zeros((1, 64, 8), np.float32))
        path.write_bytes(path.read_bytes()[:1000])
    elif case == "bad crc":
        np.savez(path, features=np.full((1, 64, 8), 1.5, np.float32))
        raw = bytearray(path.read_bytes())
        at = raw.index(np.full(64, 1.5, np.float32).tobytes())
        raw[at] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif case == "header of 3.55 PiB":
        _zip(path, {"features.npy": _npy_bytes(header={"descr": "<f4", "fortran_order": False,
                                                        "shape": (10**6, 10**6, 1000)})})
    elif case == "float128":
        np.savez(path, features=np.zeros((1, 4, 2), np.longdouble))
    elif case == "objects":
        np.savez(path, features=np.array([[[1.0, None]]], dtype=object))
    elif case == "bad header":
        _zip(path, {"features.npy": b"\x93NUMPY\x01\x00\x10\x00{'descr': nonsense"})
    assert message in _refused(path, capsys)


def test_data_file_larger_than_memory_is_refused_before_reading(tmp_path, capsys, monkeypatch):
    from mmrprune.bench import token_file
    data = _npz(tmp_path, features=np.zeros((1, 64, 8), np.float32))
    monkeypatch.setattr(token_file, "_memory_bytes", lambda: 1000)
    monkeypatch.setattr(token_file.npy_format, "read_array", lambda *a, **k: pytest.fail("read the data"))
    assert "'features' is 2,048 bytes, more than this machine's 1,000 bytes of memory" in _refused(data, capsys)


def test_d2pruner_is_benchmarkable_with_the_presets_grid_and_its_flags(tmp_path, capsys):
    path = tmp_path / "d2.json"
    rc, out, err = _run(["--preset", "dinov2", "--batch", "1", "--dim", "32", "--k", "8", "--repeats", "1",
                         "--backend", "torch,numpy", "--method", "d2pruner", "--quiet", "--json", str(path)], capsys)
    assert rc == 0, out + err
    assert [r["params"] for r in json.loads(path.read_text())] == ["grid=32x32"] * 2
    rc, out, err = _run(TINY + ["--backend", "numpy", "--method", "d2pruner", "--grid", "8x8", "--alpha", "0.7",
                                "--tau", "0.4", "--pivot-ratio", "0.25", "--radius", "2", "--json", str(path)], capsys)
    assert rc == 0, out + err
    assert json.loads(path.read_text())[0]["params"] == "alpha=0.7,grid=8x8,pivot_ratio=0.25,radius=2,tau=0.4"


def test_a_run_that_measured_nothing_exits_nonzero(capsys):
    # a custom shape has no grid: d2pruner (alpha < 1) cannot run, and says what to pass
    rc, out, err = _run(TINY + ["--backend", "numpy", "--method", "d2pruner"], capsys)
    assert rc == 1
    assert "--grid ROWSxCOLS" in out and "no case ran" in err
    rc, out, err = _run(TINY + ["--backend", "anchor", "--method", "topk"], capsys)
    assert rc == 1 and "no case ran" in err


def test_bad_grid_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(TINY + ["--grid", "8by8"])
    assert exc.value.code == 2 and "ROWSxCOLS" in capsys.readouterr().err


def test_numbers_are_fixed_point_with_thousands_separators():
    from mmrprune.bench.records import format_number
    assert [format_number(v) for v in (3680.4, 123.45, 12.345, 0.957, 0.000123, 2e7, 1.0, None)] == [
        "3,680", "123.5", "12.35", "0.957", "0.000123", "20,000,000", "1", "-"]


def test_table_leads_with_the_anchor_speedup_and_explains_every_column(capsys):
    rc, out, err = _run(TINY + ["--backend", "torch,anchor", "--method", "mmr"], capsys)
    assert rc == 0, err
    header = out.splitlines()[1].split()
    assert header.index("anchor") < header.index("median")  # "x anchor" comes before the timings
    legend = speed.LEGEND
    for column in ("x anchor", "median ms", "us/step", "img/s", "x torch"):
        assert f"\n{column}" in "\n" + legend and legend in out
    assert "baselines.py" in legend and "host sync" in legend


# ----------------------------------------------------------------------------- committed results
def test_downstream_writes_a_fresh_folder_unless_update_committed(tmp_path, monkeypatch, capsys):
    """A full ``downstream`` run from the repository root leaves the committed records alone."""
    from mmrprune.bench import downstream
    with open(os.path.join(REPO, "bench", "results", "downstream.json"), encoding="utf-8") as f:
        records = json.load(f)   # stands in for the 13-minute run
    monkeypatch.setattr(downstream, "check_inputs", lambda cfg: None)
    monkeypatch.setattr(downstream, "run_downstream", lambda cfg, env, progress: [dict(r) for r in records])
    committed = tmp_path / "bench" / "results"
    committed.mkdir(parents=True)
    (tmp_path / "bench" / "figures").mkdir()
    for name in ("downstream.json", "downstream.csv"):
        (committed / name).write_text("committed\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["downstream", "--quiet"]) in (0, 1)    # 1 only without matplotlib
    (run,) = (tmp_path / cli.FRESH_OUT).iterdir()
    assert run.name.startswith("downstream-") and len(json.loads((run / "downstream.json").read_text())) == len(records)
    assert all((committed / name).read_text() == "committed\n" for name in ("downstream.json", "downstream.csv"))
    assert not (tmp_path / "bench" / "figures" / "downstream.png").exists()
    assert cli.main(["downstream", "--quiet", "--update-committed"]) in (0, 1)
    assert len(json.loads((committed / "downstream.json").read_text())) == len(records)
    with pytest.raises(SystemExit) as exc:
        cli.main(["downstream", "--quick", "--update-committed"])
    assert exc.value.code == 2 and "drop --quick" in capsys.readouterr().err


def test_speed_figures_colour_each_backend_the_same_and_have_a_legend():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    def records(backends, methods=("mmr", "divprune")):
        base = dict(device="cpu", preset="p", batch=1, tokens=64, dim=8, k=8, dtype="float16")
        return [dict(base, backend=b, method=m, median_ms=1.0 + i, p20_ms=0.9 + i, p80_ms=1.1 + i)
                for i, (b, m) in enumerate((b, m) for b in backends for m in methods)]

    colour_of = {}
    for backends in (["cpu", "torch", "anchor"], ["anchor", "numpy"], ["torch", "triton", "cuda"]):
        fig = plotting.speed_figure(records(backends))
        try:
            ((ax,),) = [fig.axes]
            for bar, label in zip(ax.patches, ax.get_yticklabels()):
                backend = label.get_text().split(" / ")[1]
                assert colour_of.setdefault(backend, to_hex(bar.get_facecolor())) == to_hex(bar.get_facecolor())
            (legend,) = fig.legends
            assert sorted(t.get_text() for t in legend.get_texts()) == sorted(backends)
            for handle, text in zip(legend.legend_handles, legend.get_texts()):
                assert to_hex(handle.get_facecolor()) == colour_of[text.get_text()]
        finally:
            plt.close(fig)
    assert len(set(colour_of.values())) == len(colour_of) == 6


def test_downstream_selectors_run_without_warnings():
    """Every default downstream method runs at its defaults; lam goes only to the methods that use it."""
    import warnings

    from mmrprune.bench import downstream
    g = torch.Generator().manual_seed(0)
    feats, imp = torch.randn(2, 256, 8, generator=g), torch.rand(2, 256, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for m in downstream.default_methods():
            idx = downstream.choose(m, feats, imp, 16, (16, 16), first_image=0, layer=3)
            assert tuple(idx.shape) == (2, 16), m.name
