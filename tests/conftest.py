"""Shared fixtures for the scoring tests: one tiny random CLIP per session, synthetic data.

Everything runs on the registered ``linewatch-tiny`` architecture (64 px, patch 8,
4 blocks) with random weights, so nothing is ever downloaded.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from linewatch.scoring.backbone import TINY_ARCH, Backbone, BackboneConfig
from linewatch.scoring.prompts import PromptPack

from helpers import Processes


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread():
    """The tiny model's tensors are far too small to gain from intra-op threads, and on a
    busy 2-core machine the OpenMP barriers make every op ~300x slower (0.5 s instead of
    1.5 ms per forward). One thread for the session, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def cache_dirs(tmp_path_factory):
    """Text anchors, reference memories and thresholds cached across runs go to temporary
    folders, not the user's home (child `linewatch` processes inherit them)."""
    import os

    folders = {"LINEWATCH_ANCHOR_DIR": "anchors", "LINEWATCH_PREPARED_DIR": "prepared"}
    previous = {name: os.environ.get(name) for name in folders}
    os.environ.update({name: str(tmp_path_factory.mktemp(folder)) for name, folder in folders.items()})
    yield
    for name, value in previous.items():
        if value is None:
            del os.environ[name]
        else:
            os.environ[name] = value


@pytest.fixture(scope="session", autouse=True)
def metrics_on_any_port():
    """Commands under test (in process or as child processes) serve /metrics on a free port each,
    never the default 9400 another process may hold."""
    import os

    previous = os.environ.get("LINEWATCH_OPS__PORT")
    os.environ["LINEWATCH_OPS__PORT"] = "0"
    yield
    if previous is None:
        del os.environ["LINEWATCH_OPS__PORT"]
    else:
        os.environ["LINEWATCH_OPS__PORT"] = previous


@pytest.fixture(scope="session")
def tiny() -> Backbone:
    """The tiny backbone, random weights, seed 0. Shared: tests must not modify it."""
    return Backbone.build(BackboneConfig(arch=TINY_ARCH))


@pytest.fixture(scope="session")
def tiny_seed1() -> Backbone:
    """The same architecture with different random weights (seed 1)."""
    return Backbone.build(BackboneConfig(arch=TINY_ARCH, seed=1))


@pytest.fixture(scope="session")
def tiny_vv() -> Backbone:
    """The tiny backbone (seed 0) with the V-V attention path (CLIP-VV), as KAnoCLIP requires."""
    return Backbone.build(BackboneConfig(arch=TINY_ARCH, vv_attention=True))


@pytest.fixture(scope="session")
def tiny_vv_seed1() -> Backbone:
    return Backbone.build(BackboneConfig(arch=TINY_ARCH, vv_attention=True, seed=1))


@pytest.fixture(scope="session")
def make_images():
    """Deterministic uniform images in [0, 1]: make_images(n, height=64, width=None, seed=0)."""

    def make(n: int, height: int = 64, width: int | None = None, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(n, 3, height, width or height, generator=generator)

    return make


@pytest.fixture(scope="session")
def default_pack() -> PromptPack:
    return PromptPack.load()


@pytest.fixture(scope="session")
def neutral_pack() -> PromptPack:
    """Identical normal and abnormal sentences: T_N == T_A, so every zero-shot probability
    is exactly 0.5 and a method's output map is its few-shot map up to a constant."""
    return PromptPack.model_validate(
        {"states": {"normal": ["{}"], "abnormal": ["{}"]}, "templates": ["a photo of a {}."]})


@pytest.fixture(scope="session")
def anchor_cache(tiny):
    """anchor_cache(method_name, class_name): anchors built once per session (default pack)."""
    from linewatch.scoring.methods import create_method

    cache = {}

    def get(method: str, class_name: str):
        if (method, class_name) not in cache:
            cache[method, class_name] = create_method(method, tiny).build_anchors(class_name)
        return cache[method, class_name]

    return get


@pytest.fixture(scope="session")
def texture_data() -> SimpleNamespace:
    """Few-shot data: 4 normal references, 4 new normal test images and 4 test images
    with a pasted saturated 16x16 square (red or blue) whose location is in ``masks``."""
    size, defect = 64, 16
    rng = np.random.default_rng(1234)

    def textures(n: int) -> np.ndarray:
        """Smooth oriented stripes (fixed frequencies and orientations, random phases) plus
        faint noise around mid grey: the same 'kind' of texture for every draw."""
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        tint = np.array([0.10, 0.08, 0.06], np.float32)[:, None, None]
        out = []
        for _ in range(n):
            image = np.full((3, size, size), 0.5, np.float32)
            for frequency, angle in [(3, 0.3), (5, 1.2), (7, 2.0)]:
                phase = rng.uniform(0, 2 * np.pi)
                image += tint * np.sin(2 * np.pi * frequency * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
            image += rng.normal(0, 0.02, image.shape).astype(np.float32)
            out.append(image)
        return np.clip(np.stack(out), 0.0, 1.0)

    references = textures(4)
    normals = textures(4)
    defects = textures(4)
    masks = np.zeros((4, size, size), bool)
    colours = [(1.0, 0.0, 0.0), (0.0, 0.0, 1.0)]
    for i in range(4):
        top, left = rng.integers(4, size - defect - 4, 2)
        defects[i, :, top:top + defect, left:left + defect] = np.array(colours[i % 2], np.float32)[:, None, None]
        masks[i, top:top + defect, left:left + defect] = True
    return SimpleNamespace(references=torch.from_numpy(references), normals=torch.from_numpy(normals),
                           defects=torch.from_numpy(defects), masks=masks)


@pytest.fixture
def webhook():
    """webhook(statuses, answer=None, port=0, delay_s=0): a real HTTP receiver on loopback (helpers.Webhook),
    closed after the test."""
    from helpers import Webhook

    servers = []

    def start(statuses, answer=None, **options):
        servers.append(Webhook(statuses, answer, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


# ---- real services (tests using them are marked `services`: `pytest -m "not services"` skips them) ----
SERVICE_FIXTURES = {"kafka_servers", "redis_url", "s3_server"}


def pytest_configure(config):
    config.addinivalue_line("markers", "services: starts real services (Tansu, Redis, SeaweedFS S3) or whole "
                                       "linewatch processes on loopback; minutes, not seconds")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


@pytest.fixture(scope="session")
def kafka_servers(tmp_path_factory):
    """A real Kafka-protocol broker (Tansu) on loopback for the session: 'host:port'."""
    from services import tansu_broker

    with tansu_broker(tmp_path_factory.mktemp("tansu")) as servers:
        yield servers


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server on loopback for the session: 'redis://127.0.0.1:PORT/0'."""
    from services import redis_server

    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on loopback for the session, with one bucket."""
    from services import s3_server

    with s3_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def processes(tmp_path):
    """linewatch parts started as processes for one test (tests/helpers.Processes), all stopped after."""
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()
