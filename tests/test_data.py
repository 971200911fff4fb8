import numpy as np
import pyarrow.parquet as pq
import pytest

from rayworld.data import (
    Manifest,
    ShardError,
    episode_schema,
    iter_frames,
    open_shard,
    rank_share,
    read_series,
    split_episodes,
    stream_frames,
    stream_windows,
    write_episode,
    write_series,
)


def _episode(n, seed=0):
    rng = np.random.default_rng(seed)
    obs = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    act = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    rew = rng.normal(size=n).astype(np.float32)
    term = np.zeros(n, bool)
    term[-1] = True
    return obs, act, rew, term, np.zeros(n, bool)


def test_episode_round_trip_and_metadata(tmp_path):
    obs, act, rew, term, trunc = _episode(300)
    path = tmp_path / "ep-000003.parquet"
    write_episode(path, 3, obs, act, rew, term, trunc, meta={"env_id": "x"})
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    pf = open_shard(path)
    assert pf.schema_arrow.metadata[b"rayworld.schema_version"] == b"1"
    assert pf.schema_arrow.metadata[b"rayworld.env_id"] == b"x"
    frames = np.concatenate(list(iter_frames([path], (64, 64, 3), 128)))
    np.testing.assert_array_equal(frames, obs)
    table = pq.read_table(path)  # plain pyarrow reads it too
    assert table.num_rows == 300
    np.testing.assert_allclose(np.stack(table.column("action").to_pylist()), act)
    assert table.column("terminated").to_pylist()[-1] is True


def test_corrupt_and_truncated_shards_name_the_file(tmp_path):
    obs, act, rew, term, trunc = _episode(300)
    trunc_path, bad_path = tmp_path / "ep-000000.parquet", tmp_path / "ep-000001.parquet"
    for p in (trunc_path, bad_path):
        write_episode(p, 0, obs, act, rew, term, trunc, meta={}, compression="none")
    data = trunc_path.read_bytes()
    trunc_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="ep-000000.parquet.*corrupt or truncated"):
        open_shard(trunc_path)
    data = bytearray(bad_path.read_bytes())
    data[len(data) // 3: len(data) // 3 + 5000] = b"\x00" * 5000  # inside the obs pages
    bad_path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="ep-000001.parquet"):
        list(iter_frames([bad_path], (64, 64, 3), 64))


def test_other_schema_version_is_reported(tmp_path):
    obs, act, rew, term, trunc = _episode(10)
    path = tmp_path / "ep-000000.parquet"
    write_episode(path, 0, obs, act, rew, term, trunc, meta={})
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    meta[b"rayworld.schema_version"] = b"0"
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(ShardError, match="version 0 found, expected 1"):
        open_shard(path)


def test_stream_frames_exact_batches_and_coverage(tmp_path):
    files, all_obs = [], []
    for e in range(5):
        obs = np.full((100, 64, 64, 3), e, np.uint8)  # frames tagged by episode
        obs[:, 0, 0, 0] = np.arange(100)
        path = tmp_path / f"ep-{e:06d}.parquet"
        write_episode(path, e, obs, *_episode(100)[1:], meta={})
        files.append(path)
        all_obs.append(obs)
    batches = list(stream_frames(files, (64, 64, 3), 32, 15, buffer=256, seed=1))
    assert len(batches) == 15 and all(b.shape == (32, 64, 64, 3) for b in batches)
    seen = {(int(f[0, 0, 1]), int(f[0, 0, 0])) for b in batches[:15] for f in b}
    assert len(seen) == 15 * 32  # one pass (500 frames) holds 480 distinct frames
    first = np.stack([b[:, 0, 0, 1] for b in batches[:3]])
    assert len(np.unique(first)) > 1  # shuffled across episodes
    again = list(stream_frames(files, (64, 64, 3), 32, 15, buffer=256, seed=1))
    assert all((a == b).all() for a, b in zip(batches, again))  # seeded


def test_split_and_rank_share_are_disjoint():
    train, val = split_episodes(range(40), 10)
    assert val == [9, 19, 29, 39] and not set(train) & set(val)
    shares = [rank_share(train, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == train
    assert all(not set(a) & set(b) for i, a in enumerate(shares) for b in shares[i + 1:])


def test_series_windows_masks(tmp_path):
    n, z = 70, 4
    mu = np.arange(n * z, dtype=np.float32).reshape(n, z)
    act = np.ones((n, 3), np.float32)
    rew = np.arange(n, dtype=np.float32)
    term = np.zeros(n, bool)
    term[-1] = True
    path = tmp_path / "s.parquet"
    write_series(path, 0, mu, np.zeros_like(mu), act, rew, term, np.zeros(n, bool), meta={})
    ep = read_series(path)
    np.testing.assert_array_equal(ep["mu"], mu)
    batches = list(stream_windows([path], [n], seq_len=32, batch_size=2, num_batches=1,
                                  group_steps=1000, seed=0))
    b = batches[0]
    assert b["mu"].shape == (2, 33, z) and b["action"].shape == (2, 32, 3)
    for w in range(2):  # target z is the next step's mu, and rewards line up with inputs
        start = int(b["reward"][w, 0])
        np.testing.assert_array_equal(b["mu"][w, 1], mu[start + 1])
    short = tmp_path / "short.parquet"
    write_series(short, 1, mu[:10], np.zeros_like(mu[:10]), act[:10], rew[:10], term[-10:],
                 np.zeros(10, bool), meta={})
    w = list(stream_windows([short], [10], 32, 1, 1, 100, 0))[0]
    assert w["mask"][0].sum() == 10 and w["z_mask"][0].sum() == 9 and w["done"][0, 9] == 1


def test_manifest_round_trip(tmp_path):
    m = Manifest(tmp_path, {"env_id": "x"}, {})
    m.shards[2] = {"file": "episodes/ep-000002.parquet", "steps": 5, "return": 1.0, "bytes": 9}
    m.save()
    again = Manifest.load(tmp_path)
    assert again.shards == m.shards and again.frames == 5
    with pytest.raises(FileNotFoundError, match="rayworld collect"):
        Manifest.load(tmp_path / "nope")


def test_schema_has_required_columns():
    names = episode_schema((64, 64, 3), 3, {}).names
    assert {"episode", "step", "obs", "action", "reward", "terminated", "truncated"} <= set(names)


def test_first_latents_match_the_first_row(tmp_path):
    from rayworld.data import first_latents

    n, z = 600, 4  # more than one row group
    mu = np.random.default_rng(0).normal(size=(n, z)).astype(np.float32)
    path = tmp_path / "s.parquet"
    write_series(path, 0, mu, mu * 2, np.zeros((n, 3)), np.zeros(n), np.zeros(n, bool),
                 np.zeros(n, bool), meta={})
    m0, lv0 = first_latents(path)
    np.testing.assert_array_equal(m0, mu[0])
    np.testing.assert_array_equal(lv0, mu[0] * 2)


def test_rebatch_gives_fixed_shapes_with_every_frame_in_order():
    from rayworld.data import rebatch

    lengths = [200, 37, 1, 256, 90, 513]  # episodes of many lengths, as validation meets them
    frames = np.arange(sum(lengths))
    parts = np.split(frames, np.cumsum(lengths)[:-1])
    out = list(rebatch(iter(parts), 256))
    assert [len(b) for b in out] == [256] * 4 + [len(frames) - 4 * 256]
    assert np.array_equal(np.concatenate(out), frames)
    assert list(rebatch(iter([]), 256)) == []


@pytest.mark.slow  # ~1 min: 40 forward passes of the VAE
def test_varied_batch_shapes_grow_memory_and_fixed_shapes_do_not():
    """Why rebatch exists: oneDNN keeps kernels and scratch memory per input shape."""
    import subprocess
    import sys

    code = ("import sys, torch, psutil\n"
            "from rayworld.models.vae import ConvVAE\n"
            "torch.set_num_threads(1); m = ConvVAE().eval(); p = psutil.Process()\n"
            "with torch.no_grad():\n"
            "    m(torch.rand(64, 3, 64, 64)); before = p.memory_info().rss\n"
            "    for i in range(40):\n"
            "        m(torch.rand(64 if sys.argv[1] == 'fixed' else 65 + i, 3, 64, 64))\n"
            "print((p.memory_info().rss - before) / 2**20)\n")
    grew = {mode: float(subprocess.run([sys.executable, "-c", code, mode], capture_output=True,
                                       text=True, check=True).stdout.split()[-1])
            for mode in ("fixed", "varied")}
    assert grew["fixed"] < 50 and grew["varied"] > 4 * max(grew["fixed"], 50), grew


def test_encode_pads_short_batches_to_few_shapes_with_the_same_latents():
    """Every episode's last batch has its own length; encode pads it to one of a few shapes."""
    import torch

    from rayworld.encode import encode_frames, padded_size
    from rayworld.models.vae import ConvVAE

    torch.manual_seed(0)
    model = ConvVAE(latent=8).eval()
    seen = []
    model.encoder.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8) for n in (64, 37, 1, 20)]
    mus, logvars = encode_frames(model, iter(batches), 64)
    assert seen == [64, 64, 16, 32]  # 37 -> 64, 1 -> 16, 20 -> 32
    assert [len(m) for m in mus] == [64, 37, 1, 20] == [len(v) for v in logvars]
    seen.clear()
    plain, _ = encode_frames(model, iter(batches), 64, pad=False)
    assert seen == [64, 37, 1, 20]
    for a, b in zip(mus, plain):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    sizes = {padded_size(n, 256) for n in range(1, 257)}
    assert sizes == {16, 32, 64, 128, 256}
