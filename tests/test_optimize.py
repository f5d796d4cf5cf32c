"""edgeslim optimize: the allocation on estimates, the verify / re-aim search, the Pareto set, the result
cache and bad input. The end-to-end runs on a tiny encoder are marked slow."""
import json
import math

import pytest
import torch
from torch import nn

from edgeslim.cli import main
from edgeslim.compress.lowrank_budget import LayerSpectrum
from edgeslim.compress.lowrank_latency import LayerTimes
from edgeslim.core.errors import ConfigError
from edgeslim.core.specs import TensorSpec
from edgeslim.loaded import LoadedModel
from edgeslim.artifact import SourceSpec
from edgeslim.optimize_search import Point, choose, estimate, pareto, search
from edgeslim.optimize_space import Combo, Space, Stage, combos_of


class GemmLaw:
    """A target whose GEMM costs a fixed overhead plus time per multiply-add (ms)."""

    times_models = True

    def gemm_ms(self, m, k, n):
        return 0.01 + 1e-6 * m * k * n


def spectrum(name, m, n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.sort(torch.rand(min(m, n), generator=g, dtype=torch.float64), descending=True).values
    return LayerSpectrum(name, m, n, m, 0.01 * s.square() / s.square().sum(), scale)  # loss at most 0.01 * scale


def space(int8_factor=None, axis="ms"):
    """A dense combo (three linear maps, 64 rows each) and, optionally, an INT8 one `int8_factor` times faster."""
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256), nn.Linear(256, 256))
    loaded = LoadedModel(model, SourceSpec("zoo", "test"), [TensorSpec("x", ("batch", 256))], "generic", {})
    spectra = [spectrum("0", 512, 256, 0, 3.0), spectrum("1", 256, 512, 1), spectrum("2", 256, 256, 2, 0.5)]
    layers = [LayerTimes(s, 64, GemmLaw()) for s in spectra]
    other = 1.0  # ms outside the linear maps
    base = other + sum(t.dense_ms for t in layers)
    combos = [Combo((), loaded, base, base, 0.0, layers, spectra)]
    if int8_factor:
        combos.append(Combo((Stage("int8", "int8", {"method": "int8"}),), loaded, base / int8_factor, base, 0.05,
                            layers, spectra))
    if axis == "bytes":
        for c in combos:
            c.cost = c.dense_cost = float(sum(p.numel() for p in model.parameters()) * 4)
    return Space(combos, combos[0].cost, {}, None, 8)


@pytest.mark.parametrize("aim", [1.1, 1.3, 1.6, 2.0])
def test_the_allocation_never_exceeds_the_budget_estimate(aim):
    sp = space(int8_factor=1.4)
    for combo in sp.combos:
        e = estimate(combo, sp, aim, "ms")
        if e is None:
            continue
        assert e.cost <= sp.base_cost / aim * (1 + 1e-9)
        # the estimate is the combo's measured time less its layers' GEMM savings, scaled by its INT8 ratio
        saved = sum(t.dense_ms - t.ms_at(e.ranks[t.spectrum.name]) for t in combo.layers)
        assert e.cost == pytest.approx(combo.cost - combo.cost / combo.dense_cost * saved, rel=1e-9)
        assert e.loss == pytest.approx(combo.loss + sum(s.error_at(e.ranks[s.name]) for s in combo.spectra
                                                        if e.ranks[s.name] is not None))


def test_the_size_allocation_never_exceeds_the_budget_estimate():
    sp = space(axis="bytes")
    for aim in (1.2, 1.5, 2.0):
        e = estimate(sp.combos[0], sp, aim, "bytes")
        assert e is not None and e.cost <= sp.base_cost / aim
        kept = sum(s.params_at(e.ranks[s.name]) if e.ranks[s.name] else s.dense_params for s in sp.combos[0].spectra)
        assert e.cost == pytest.approx(sp.base_cost - 4 * (sum(s.dense_params for s in sp.combos[0].spectra) - kept))


def test_a_combo_already_within_budget_needs_no_factoring():
    sp = space(int8_factor=2.0)
    e = estimate(sp.combos[1], sp, 1.5, "ms")
    assert all(r is None for r in e.ranks.values()) and e.gain == pytest.approx(2.0) and e.loss == 0.05


def fake_verify(law, drop_per_loss=1.0, log=None):
    """Measured gain = law(estimated gain); metric drop proportional to the estimated loss."""
    def verify(estimates, round_):
        out = []
        for e in estimates:
            if log is not None:
                log.append((round_, e.label, e.gain))
            out.append(Point(e.label, e.families, e.combo.steps(e.ranks, "c", 8), e.gain, e.loss, law(e.gain),
                             1.0 - drop_per_loss * e.loss, drop_per_loss * e.loss, {}, e.combo.label, round_))
        return out
    return verify


def test_the_search_reaims_from_measured_points_until_within_five_percent():
    sp = space()
    log = []
    outcome = search(sp, "ms", 1.5, max_drop=10.0, verify=fake_verify(lambda g: g ** 0.7, log=log))
    assert outcome.met and 1.5 * 0.95 <= outcome.chosen.gain
    assert outcome.rounds > 1  # the first estimate (1.5x) measured 1.33x: re-aimed
    first = [g for r, _, g in log if r == 0]
    later = [g for r, _, g in log if r > 0]
    assert max(later) > max(first)  # aimed higher than asked once the measurements fell short


def test_an_out_of_reach_budget_reports_the_best_point_found():
    sp = space()
    outcome = search(sp, "ms", 1.5, max_drop=10.0, verify=fake_verify(lambda g: min(g, 1.2)), rounds=3)
    assert not outcome.met
    assert outcome.chosen.gain == max(p.gain for p in outcome.points) == pytest.approx(1.2)


def test_with_nothing_within_the_metric_budget_the_least_loss_is_reported():
    fast_broken = Point("prune", ("prune",), [], 3.3, 0.5, gain=3.31, metric=0.0, drop=1.0)
    slower_close = Point("int8", ("int8",), [], 2.0, 0.05, gain=2.05, metric=0.905, drop=0.095)
    chosen, met = choose([fast_broken, slower_close], 1.5, max_drop=0.01)
    assert not met and chosen is slower_close


def test_an_estimate_out_of_reach_of_every_combo_is_refused():
    with pytest.raises(ConfigError, match="out of reach"):
        search(space(), "ms", 50.0, max_drop=1.0, verify=fake_verify(lambda g: g))


def test_the_metric_budget_decides_between_candidates():
    sp = space(int8_factor=1.6)
    outcome = search(sp, "ms", 1.5, max_drop=0.04, verify=fake_verify(lambda g: g))
    assert outcome.chosen.drop <= 0.04  # int8's measured loss 0.05 breaks the metric budget
    assert "int8" not in outcome.chosen.families and "int8" in outcome.best_single


def test_pareto_front_of_known_points():
    pts = [{"gain": 1.0, "metric": 0.90}, {"gain": 1.5, "metric": 0.88}, {"gain": 1.4, "metric": 0.85},
           {"gain": 2.0, "metric": 0.80}, {"gain": 1.8, "metric": 0.80}, {"gain": 0.9, "metric": 0.95}]
    assert pareto(pts) == [5, 0, 1, 3]
    ppl = [{"gain": 1.0, "metric": 10.0}, {"gain": 1.5, "metric": 11.0}, {"gain": 1.4, "metric": 12.0},
           {"gain": 2.0, "metric": 13.0}, {"gain": 1.8, "metric": 13.0}]
    assert pareto(ppl, higher_better=False) == [0, 1, 3]  # perplexity: lower is better


def test_combos_take_at_most_one_stage_per_family():
    prune = [Stage("prune", f"prune {r}", {}) for r in (0.75, 0.5)]
    int8 = [Stage("int8", "int8", {})]
    combos = combos_of([prune, int8])
    labels = [tuple(s.label for s in c) for c in combos]
    assert combos[0] == () and len(combos) == 6 and len(set(labels)) == 6
    assert all(len({s.family for s in c}) == len(c) for c in combos)


def test_steps_follow_the_pipeline_order():
    sp = space()
    combo = Combo((Stage("int8", "int8", {"method": "int8"}), Stage("prune", "prune 0.5", {"method": "prune"})),
                  sp.combos[0].loaded)
    steps = combo.steps({"a": 16, "b": None, "c": 16, "d": 32}, "sentences", 8)
    assert [s["method"] for s in steps] == ["prune", "asvd", "asvd", "int8"]
    assert steps[1]["target"] == ["a", "c"] and steps[1]["rank"] == 16 and steps[2]["target"] == ["d"]


def test_a_cached_result_is_reused_on_resume(tmp_path, monkeypatch):
    from edgeslim import optimize_jobs
    from edgeslim.optimize_jobs import Job, run_job, store_result

    job = Job("tiny-bert", ({"method": "prune", "ratio": 0.5},), "cpu-ort-fp32", "sentences", str(tmp_path), "fp")
    first = run_job(job)
    assert not first["cached"] and not first["artifact_reused"] and 0 < first["metric"] <= 1
    store_result(tmp_path, first["key"], first | {"gain": 1.7})
    import edgeslim.evaluate
    real, calls = edgeslim.evaluate.evaluate, []
    monkeypatch.setattr(edgeslim.evaluate, "evaluate", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = run_job(job)
    assert again["cached"] and again["gain"] == 1.7 and again["metric"] == first["metric"] and not calls
    other = run_job(Job(job.source, job.steps, job.profile, job.eval, job.folder, "another target"))
    assert not other["cached"] and other["artifact_reused"] and len(calls) == 1  # another target: evaluated again
    assert json.loads((tmp_path / optimize_jobs.RESULTS).read_text()).keys() == {first["key"]}


def test_bad_options_exit_2_before_any_work(in_tmp, capsys):
    base = ["optimize", "tiny-bert", "--eval", "sentences", "--max-drop", "0.01", "-o", "out"]
    assert main(base) == 2  # no budget
    assert "exactly one budget" in capsys.readouterr().err
    assert main(base + ["--speedup", "2", "--size-mb", "1"]) == 2
    assert main(base + ["--speedup", "2", "--families", "asvd,magic"]) == 2
    assert "unknown family magic" in capsys.readouterr().err
    assert main(base + ["--speedup", "0.5"]) == 2
    (in_tmp / "out").mkdir()
    (in_tmp / "out" / "mine.txt").write_text("not edgeslim's")
    assert main(base + ["--speedup", "2"]) == 2
    assert "replaces only what it wrote" in capsys.readouterr().err
    assert not (in_tmp / "out" / "optimize.json").exists()


def test_eval_without_labels_and_a_family_that_cannot_apply(in_tmp, tmp_path, capsys):
    from test_tasks import bert64
    folder = bert64(tmp_path / "b")
    (in_tmp / "nolabel.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in "abcd"))
    assert main(["optimize", str(folder), "--speedup", "2", "--eval", "nolabel.jsonl", "--max-drop", "0.01",
                 "--calib", "sentences", "-o", "out"]) == 2
    err = capsys.readouterr().err
    assert "original model on --eval" in err and "'label'" in err and err.count("error:") == 1
    assert main(["optimize", "tiny-bert", "--speedup", "2", "--eval", "sentences", "--max-drop", "0.01",
                 "--families", "wq", "-o", "out"]) == 2
    assert "family 'wq' cannot apply" in capsys.readouterr().err
    assert not (in_tmp / "out").exists()


def test_a_ray_address_that_does_not_answer(in_tmp, capsys):
    code = main(["optimize", "tiny-bert", "--speedup", "2", "--eval", "sentences", "--max-drop", "0.01",
                 "--ray", "127.0.0.1:9", "-o", "out"])
    try:
        import ray  # noqa: F401
    except ImportError:
        assert code == 4 and "pip install 'edgeslim[ray]'" in capsys.readouterr().err
        return
    assert code == 2 and "does not answer" in capsys.readouterr().err


@pytest.mark.slow
def test_jobs_on_a_local_ray_match_local_ones(tmp_path):
    ray = pytest.importorskip("ray")
    from edgeslim.optimize_jobs import Job, Runner

    jobs = [Job("tiny-bert", steps, "cpu-ort-fp32", "sentences", str(tmp_path / "w"), "fp")
            for steps in ((), ({"method": "prune", "ratio": 0.5},))]
    (tmp_path / "w").mkdir()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        remote = {}
        with Runner(ray_address="auto") as runner:
            runner.map(jobs, lambda j, r: remote.__setitem__(j.key, r))
    finally:
        ray.shutdown()
    local = {}
    with Runner(workers=2) as runner:  # two local worker processes
        runner.map(jobs, lambda j, r: local.__setitem__(j.key, r))
    for j in jobs:
        assert local[j.key]["artifact_reused"]  # built by the Ray workers, in the same work folder
        assert local[j.key]["metric"] == remote[j.key]["metric"]
        assert local[j.key]["artifact_sha256"] == remote[j.key]["artifact_sha256"]


@pytest.fixture
def encoder(tmp_path):
    """A 2-layer BERT encoder, hidden 256: wide enough for factored linear maps to pay off."""
    import transformers
    from test_tasks import VOCAB, save, tokenizer
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=1024, max_position_embeddings=64)
    return save(transformers.BertModel(cfg), tmp_path / "enc", tokenizer())


@pytest.mark.slow
def test_optimize_end_to_end_replays_and_resumes(in_tmp, encoder, capsys, monkeypatch):
    from safetensors.torch import load_file
    monkeypatch.setenv("EDGESLIM_CACHE", str(in_tmp / "cache"))
    args = ["optimize", str(encoder), "--speedup", "1.3", "--eval", "sentences", "--max-drop", "0.05", "--calib",
            "sentences", "--families", "asvd,prune", "--rounds", "2", "--top", "1", "-o", "out"]
    assert main(args) == 0
    out = capsys.readouterr()
    summary = json.loads((in_tmp / "out" / "optimize.json").read_text())
    assert {p.name for p in (in_tmp / "out").iterdir()} >= {"recipe.toml", "best.slim", "best.onnx", "report.html"}
    assert out.err.count("[round ") == len(summary["points"]) and "candidate" in out.out
    assert set(summary["best_single_family"]) == {"asvd", "prune"}
    assert "Pareto front" in (in_tmp / "out" / "report.html").read_text()
    pts = summary["points"]
    assert [i for i, p in enumerate(pts) if p["pareto"]] == sorted(pareto(pts))
    # the recipe replays to the same model
    assert main(["run", "out/recipe.toml", "-o", "replay", "-q"]) == 0
    a = load_file(in_tmp / "out" / "best.slim" / "weights.safetensors")
    b = load_file(in_tmp / "replay" / "best.slim" / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # resumed: the same search finds every candidate's result in the cache
    assert main(args) == 0
    assert capsys.readouterr().err.count("(cached)") >= len(summary["points"]) - 1
    assert not math.isnan(summary["chosen"]["metric"])


@pytest.mark.slow
def test_bench_quick_mode_runs_end_to_end(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path
    monkeypatch.setenv("EDGESLIM_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("bench_optimize", Path(__file__).parents[1] / "bench" / "optimize.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--out", str(tmp_path / "r")])
    result = json.loads((tmp_path / "r" / "optimize.json").read_text())
    assert (tmp_path / "r" / "optimize.png").stat().st_size > 0 and set(result["models"]) == {"tiny-bert"}
    (row,) = result["rows"]
    assert row["asked_gain"] == 1.05 and row["points"] and "prune" in row["best_single_family"]
    assert row["within_5pct"] == (row["measured_gain"] >= 1.05 * 0.95)
    assert set(result["goals"]) >= {"optimize_ge_single_every_row", "optimize_strictly_better_half"}


def test_bench_rows_pick_the_rows_run_again_and_keep_the_others():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("bench_optimize", Path(__file__).parents[1] / "bench" / "optimize.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    picked = bench.picked_rows("minilm:1.5,minilm:2,smollm2")
    assert picked["minilm"]["speedups"] == [1.5, 2.0] and picked["smollm2"]["size_ratios"] == [0.5, 0.3]
    rows = [{"model": "minilm", "budget": "speedup", "budget_value": g} for g in (1.5, 2.0, 3.0)] + \
        [{"model": "smollm2", "budget": "size_mb", "budget_value": 269.0, "asked_size_ratio": 0.5000001},
         {"model": "efficientnet-lite0", "budget": "speedup", "budget_value": 1.5}]
    kept = [r for r in rows if not bench.rerun(r, picked)]
    assert [(r["model"], r["budget_value"]) for r in kept] == [("minilm", 3.0), ("efficientnet-lite0", 1.5)]
    with pytest.raises(SystemExit, match="unknown model 'nope'"):
        bench.picked_rows("nope:2")


def test_the_search_stops_when_no_estimate_promises_less_loss_than_a_point_that_meets():
    sp = space(int8_factor=2.0)
    sp.combos[1].loss = 0.0  # INT8 measured no loss change: nothing can promise less
    log = []
    outcome = search(sp, "ms", 1.5, max_drop=0.01, verify=fake_verify(lambda g: g ** 0.7, log=log))
    assert outcome.rounds == 1 and outcome.met and outcome.chosen.families == ("int8",)


@pytest.mark.slow
def test_a_size_budget_exports_only_the_chosen_candidate(in_tmp, encoder, monkeypatch):
    from pathlib import Path
    from edgeslim.optimize_space import weight_bytes
    from edgeslim.sources import load_model
    monkeypatch.setenv("EDGESLIM_CACHE", str(in_tmp / "cache"))
    mb = weight_bytes(load_model(str(encoder)).model) / 1e6
    assert main(["optimize", str(encoder), "--size-mb", f"{mb * 0.95:.6f}", "--eval", "sentences", "--max-drop", "1",
                 "--calib", "sentences", "--families", "wq", "--rounds", "1", "-o", "out"]) == 0
    summary = json.loads((in_tmp / "out" / "optimize.json").read_text())
    assert not list(Path(summary["work_folder"]).glob("*.onnx"))  # a size budget times nothing: no job exported
    assert summary["met"] and summary["chosen"]["families"] == ["wq"]
    exported = (in_tmp / "out" / "best.onnx").is_file()
    assert exported == ("best.onnx" in summary["files"]) and exported != ("export_note" in summary)


def test_bench_counts_a_point_strictly_better_only_where_it_meets_the_asked_gain():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("bench_optimize", Path(__file__).parents[1] / "bench" / "optimize.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    int8 = {"label": "int8", "families": ["int8"], "gain": 1.84, "metric": 0.960, "drop": 0.04}
    mix = {"label": "int8 mixed", "families": ["int8"], "mixed": True, "gain": 1.07, "metric": 0.970, "drop": 0.03}
    summary = {"chosen": mix, "metric": "accuracy", "points": [int8, mix]}
    missed = bench.compare_single(summary, 0.01, 1.5)  # better than INT8 alone, but at 1.07x for an asked 1.5x
    assert missed["best_single_at_latency"] == int8 and missed["optimize_ge_single"]
    assert not missed["optimize_strictly_better"] and "misses the asked 1.50x" in missed["note"]
    assert bench.compare_single(summary, 0.01, 1.1)["optimize_strictly_better"]  # 1.07x is within 5% of 1.1x
    assert not bench.compare_single(summary | {"chosen": int8}, 0.01, 1.5)["optimize_strictly_better"]  # a tie
