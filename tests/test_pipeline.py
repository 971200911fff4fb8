"""The CLI end to end on a tiny SimpleDriving run: collect, train-vae, encode, train-mdn.

Real Ray Train, real checkpoints, real TensorBoard event files. One module-scoped run is
shared by the tests below to keep the number of TorchTrainer.fit() calls small.
"""

import json
from pathlib import Path

import pytest
import torch

from rayworld.cli import main
from rayworld.train.common import last_checkpoint_dir


def _cli(*args):
    return main(list(args))


@pytest.fixture
def run(tiny_run):
    return tiny_run


def _scalars(tb_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_run_directory_and_report(run):
    for d in ("data", "checkpoints", "tensorboard", "images"):
        assert (run / d).is_dir()
    assert (run / "config.yaml").read_text().startswith("name: quickstart")
    report = json.loads((run / "report.json").read_text())
    assert report["frames_collected"] > 12
    assert report["env_steps_per_s"] > 0
    assert 5 < report["vae_psnr_db"] < 60
    assert 0 < report["vae_ssim"] <= 1
    assert report["mdn_nll"] == report["mdn_nll"]  # not NaN
    assert set(report["wall_s"]) == {"collect", "train-vae", "encode", "train-mdn", "evolve",
                                     "evaluate"}
    for key in ("dream_return_best", "real_return_mean", "real_return_std",
                "random_return_mean", "random_return_std"):
        assert isinstance(report[key], float) and report[key] == report[key]
    assert report["episodes"] == 4
    for png in ("vae_recon.png", "vae_curves.png", "mdn_curves.png", "evolve_curves.png",
                "dream_vs_real.gif"):
        assert (run / "images" / png).stat().st_size > 1000
    summary = (run / "summary.md").read_text()
    assert "controller real return" in summary and "images/dream_vs_real.gif" in summary


def test_checkpoints_load_with_weights_only(run):
    from rayworld.models.mdn import MDNRNN
    from rayworld.models.vae import ConvVAE

    vae = torch.load(run / "checkpoints" / "vae.pt", weights_only=True)
    ConvVAE(latent=vae["latent"]).load_state_dict(vae["model"])
    mdn = torch.load(run / "checkpoints" / "mdn.pt", weights_only=True)
    MDNRNN(latent=mdn["latent"], action_dim=mdn["action_dim"], hidden=mdn["hidden"],
           mixtures=mdn["mixtures"]).load_state_dict(mdn["model"])
    assert list((run / "checkpoints" / "vae").glob("checkpoint_*"))


def test_tensorboard_has_metrics(run):
    vae = _scalars(run / "tensorboard" / "vae")
    for tag in ("vae/loss", "vae/recon", "vae/kl", "vae/psnr_db", "vae/ssim"):
        assert len(vae[tag]) == 1
    mdn = _scalars(run / "tensorboard" / "mdn")
    for tag in ("mdn/nll", "mdn/reward_mse", "mdn/done_bce", "mdn/done_acc", "mdn/val_nll"):
        assert len(mdn[tag]) == 2
    evo = _scalars(run / "tensorboard" / "evolve")
    assert len(evo["evolve/dream_mean"]) == 6 and len(evo["evolve/real_mean"]) == 2
    # the CMA-ES mean scored in the dream at the real horizon beside each real check; that
    # evolution learns is test_learning.py's job (this run is too small to drive)
    assert len(evo["evolve/dream_check"]) == 2


def test_pipeline_rerun_skips_complete_stages(run, capsys):
    assert _cli("pipeline", "--out", str(run)) == 0
    out = capsys.readouterr().out
    for stage in ("collect", "train-vae", "encode", "train-mdn", "evolve", "evaluate"):
        assert f"{stage} is up to date, skipping it" in out


@pytest.mark.slow  # about 5 min: reruns stages one changed key at a time
def test_pipeline_redoes_exactly_what_a_changed_key_made_stale(run, tmp_path, capsys):
    import shutil

    from rayworld.pipeline import STAGES

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert _cli("pipeline", "--out", str(copy)) == 0  # whatever earlier tests did to the run
    capsys.readouterr()

    def rerun(*sets):
        args = ["pipeline", "--out", str(copy)]
        for item in sets:
            args += ["--set", item]
        assert _cli(*args) == 0
        out = capsys.readouterr().out
        return [s for s in STAGES if f"{s} is up to date, skipping it" not in out], out

    assert rerun()[0] == []
    ran, out = rerun("evolve.sigma0=0.2")
    assert ran == ["evolve", "evaluate"]
    assert "evolve is stale (evolve.sigma0 changed (0.1 -> 0.2)); running it again" in out
    assert "evaluate is stale (evolve changed since it ran)" in out
    ctrl = torch.load(copy / "checkpoints" / "controller.pt", weights_only=True)
    assert ctrl["generation"] == 6  # from scratch, not 6 more on the old state
    assert list((copy / "checkpoints" / "stale").glob("evolve-*/controller.pt"))

    ran, out = rerun("mdn.lr=0.002")
    assert ran == ["train-mdn", "evolve", "evaluate"]
    assert "evolve is stale (train-mdn changed since it ran)" in out
    assert torch.load(copy / "checkpoints" / "mdn.pt", weights_only=True)["epoch"] == 2

    # what would run is shown before anything runs
    assert _cli("status", "--run", str(copy), "--set", "vae.kl_tolerance=0.4") == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].startswith("collect: done")
    assert shown[1] == "train-vae: stale (vae.kl_tolerance changed (0.5 -> 0.4))"
    assert shown[2] == "encode: stale (train-vae will run first)"
    ran, out = rerun("vae.kl_tolerance=0.4")
    assert ran == ["train-vae", "encode", "train-mdn", "evolve", "evaluate"]
    assert "encode: the VAE changed" in out
    assert _cli("status", "--run", str(copy)) == 0
    assert all(line.endswith(": done") for line in capsys.readouterr().out.splitlines())

    # a stage run by hand on a stale input says so in one line, and does what it is told
    assert _cli("train-vae", "--out", str(copy), "--set", "vae.epochs=2") == 0
    assert _cli("train-mdn", "--out", str(copy)) == 0
    err_out = capsys.readouterr().out
    assert "rayworld train-mdn: warning: encode is stale (train-vae changed since it ran)" \
        in err_out
    # a hand run on a changed key goes on from the checkpoint, and its record says so
    assert _cli("pipeline", "--out", str(copy)) == 0
    assert _cli("train-mdn", "--out", str(copy), "--set", "mdn.lr=0.003") == 0
    assert "mdn.lr changed (0.002 -> 0.003); going on from the checkpoint there" in \
        capsys.readouterr().out
    assert _cli("status", "--run", str(copy)) == 0
    shown = capsys.readouterr().out
    assert "train-mdn: done (resumed by hand after: mdn.lr changed (0.002 -> 0.003))" in shown


def test_rerun_resumes_from_last_checkpoint(run):
    before = torch.load(run / "checkpoints" / "vae.pt", weights_only=True)
    assert before["epoch"] == 1
    assert _cli("train-vae", "--out", str(run), "--set", "vae.epochs=2") == 0
    after = torch.load(run / "checkpoints" / "vae.pt", weights_only=True)
    state = after["epoch"]
    assert state == 2  # one more epoch, not two from scratch
    assert len(_scalars(run / "tensorboard" / "vae")["vae/loss"]) == 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(run, capsys):
    good = Path(last_checkpoint_dir(run, "vae"))
    good_bytes = (good / "state.pt").read_bytes()
    rc = _cli("train-vae", "--out", str(run), "--set", "vae.epochs=4", "--set", "vae.lr=1e12")
    err = capsys.readouterr().err
    assert rc == 1
    assert "became" in err and "last good checkpoint kept" in err
    assert (good / "state.pt").read_bytes() == good_bytes
    state = torch.load(good / "state.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_bad_config_fails_with_one_line(capsys, tmp_path):
    assert _cli("collect", "--out", str(tmp_path), "--set", "vae.latnt=3") == 2
    err = capsys.readouterr().err.strip()
    assert "'vae.latnt'" in err and len(err.splitlines()) == 1


def test_results_script_rebuilds_the_command_and_reads_the_figures(run, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("results", Path(__file__).parents[1] /
                                                  "bench" / "results.py")
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    out = tmp_path / "results.md"
    assert results.main([str(run), "--out", str(out)]) == 0
    text = out.read_text()
    report = json.loads((run / "report.json").read_text())
    row = next(line for line in text.splitlines() if line.startswith("| 0 |"))
    cmd = row.split("`")[1]
    assert cmd.startswith("rayworld pipeline --config tune_configs/quickstart.yaml --out "
                          "runs/quickstart-0 ")
    assert "--set collect.episodes=12" in cmd and "--set evolve.generations=6" in cmd
    assert "ray.cpus_per_worker" not in cmd and cmd.endswith("--set seed=0")
    assert f"{report['real_return_mean']:.2f} +/- {report['real_return_std']:.2f}" in row
    assert "1 seed(s) only" in text
    assert results.main([str(tmp_path), "--out", str(out)]) == 1  # no report.json there


def test_an_interrupted_iterations_run_picks_up_in_the_round_whose_collection_began(tmp_path):
    from rayworld.config import load_config
    from rayworld.data import Manifest
    from rayworld.pipeline import first_round

    cfg = load_config(None, ["collect.episodes=40"])  # rounds collect up to 40, 80, 120
    assert first_round(cfg, tmp_path, 3) == 0  # nothing collected yet
    for have, want in [(40, 0), (41, 1), (80, 1), (81, 2), (120, 2)]:
        shards = {e: {"file": f"episodes/ep-{e:06d}.parquet", "steps": 1, "return": 0.0,
                      "bytes": 1} for e in range(have)}
        Manifest(tmp_path / "data", {}, shards).save()
        assert first_round(cfg, tmp_path, 3) == want, have
    assert first_round(cfg, tmp_path, 1) == 0  # without --iterations: round 1 only
