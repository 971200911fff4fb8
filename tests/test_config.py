from pathlib import Path

import pytest

from rayworld.config import Config, ConfigError, load_config, parse_set

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", ["quickstart", "carracing_small", "carracing"])
def test_presets_load(preset):
    cfg = load_config(ROOT / "tune_configs" / f"{preset}.yaml")
    assert cfg.name == preset
    assert cfg.vae.latent == 32 and cfg.mdn.mixtures == 5


STAGE_PRESETS = sorted(p for p in (ROOT / "tune_configs").glob("*.yaml")
                       if p.stem != "rllib_ppo" and not p.read_text().startswith("sweep:")
                       and "\nsweep:" not in p.read_text())


@pytest.mark.parametrize("path", STAGE_PRESETS, ids=lambda p: p.stem)
def test_every_preset_builds_its_env_with_its_kwargs(path):
    from rayworld.envs import known_env_ids, make_env

    cfg = load_config(path)
    assert cfg.name == path.stem
    if not cfg.env.id:  # a data-only source: nothing to play in
        assert cfg.source.kind != "env"
        return
    assert cfg.env.id in known_env_ids()
    env = make_env(cfg.env.id, **cfg.env.kwargs)  # a misspelt kwarg fails here (CARLA connects later)
    try:
        assert env.observation_space.shape == (64, 64, 3)
    finally:
        env.close()


def test_set_overrides_and_types():
    cfg = load_config(None, ["vae.lr=3e-4", "collect.episodes=7", "ray.use_gpu=true",
                             "env.kwargs={max_steps: 50}", "vae.beta=2"])
    assert cfg.vae.lr == pytest.approx(3e-4)
    assert cfg.collect.episodes == 7
    assert cfg.ray.use_gpu is True
    assert cfg.env.kwargs == {"max_steps": 50}
    assert isinstance(cfg.vae.beta, float) and cfg.vae.beta == 2.0


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["vae.latnt=16"])
    msg = str(e.value)
    assert "'vae.latnt'" in msg and "latent" in msg and "\n" not in msg


def test_bad_value_names_key_and_expected():
    with pytest.raises(ConfigError, match=r"'vae.lr'.*expected float"):
        load_config(None, ["vae.lr=fast"])
    with pytest.raises(ConfigError, match=r"'collect.policy'.*'random', 'brownian'"):
        load_config(None, ["collect.policy=greedy"])
    with pytest.raises(ConfigError, match=r"'collect.episodes'.*> 0"):
        load_config(None, ["collect.episodes=0"])
    with pytest.raises(ConfigError, match=r"'vae.epochs'.*expected int"):
        load_config(None, ["vae.epochs=2.5"])
    with pytest.raises(ConfigError, match=r"'evolve.anchor'.*>= 0"):
        load_config(None, ["evolve.anchor=-1"])
    with pytest.raises(ConfigError, match=r"'evolve.anchor'.*evolve.where 'real'"):
        load_config(None, ["evolve.anchor=1", "evolve.where=real"])
    with pytest.raises(ConfigError, match=r"'collect.mix.controller'.*model-free"):
        load_config(None, ["collect.mix={controller: 0.2}"])
    with pytest.raises(ConfigError, match=r"'collect.mix.drive'.*got 1.5.*\(0, 1\]"):
        load_config(None, ["collect.mix={drive: 1.5}"])
    with pytest.raises(ConfigError, match=r"'collect.mix': shares sum to 1.2"):
        load_config(None, ["collect.mix={drive: 0.6, random: 0.6}"])
    with pytest.raises(ConfigError, match=r"'collect.straight_lapses'.*got 1.5.*\[0, 1\]"):
        load_config(None, ["collect.straight_lapses=1.5"])
    with pytest.raises(ConfigError, match=r"'evolve.start_states'.*> 0"):
        load_config(None, ["evolve.start_states=0"])
    with pytest.raises(ConfigError, match=r"'evolve.start'.*'first', 'data'"):
        load_config(None, ["evolve.start=middle"])


def test_bad_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vae:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'vae.epochz'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_parse_set_needs_equals():
    with pytest.raises(ConfigError, match="key=value"):
        parse_set("vae.lr")


def test_round_trip_through_dict():
    cfg = load_config(None, ["mdn.hidden=128"])
    again = load_config(base=cfg.to_dict())
    assert again == cfg and isinstance(again, Config)


def test_set_one_env_kwarg_keeps_the_others():
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "tune_configs/carla.yaml", ["env.kwargs.host=10.0.0.5"])
    assert cfg.env.kwargs["host"] == "10.0.0.5"
    assert cfg.env.kwargs["port"] == 2000 and cfg.env.kwargs["town"] == "Town01"
    with pytest.raises(ConfigError, match="'env.kwargs': got 3, expected dict"):
        load_config(None, ["env.kwargs=3"])
