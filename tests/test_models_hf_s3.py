"""`hf:s3://...` models: copied once per node from a real S3-protocol server (moto, server mode, on
127.0.0.1) into the local cache, under a file lock, into a temporary directory renamed into place;
and refused by config.json's model_type before any weight is copied."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
pytest.importorskip("s3fs")
pytest.importorskip("boto3")
pytest.importorskip("moto.server")

import boto3  # noqa: E402
import s3fs  # noqa: E402

from cigma_ray.models import ModelError, ModelSpec, load  # noqa: E402

from hf_tiny import SAVERS  # noqa: E402
from s3_server import ACCESS_KEY, SECRET_KEY, aws_env, moto_s3, subprocess_env  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("cat", "red bus", "red car")

# One replica process of a node: says it is ready, waits for the go file (so that both start copying at once), loads the
# model from S3, and prints what it loaded and whether it copied (the cache logs each copy it makes).
CHILD = r"""
import json, logging, os, sys, time
from cigma_ray.models import ModelSpec, load
url, go = sys.argv[1], sys.argv[2]
copies = []
handler = logging.Handler()
handler.emit = lambda record: copies.append(record.getMessage())
logger = logging.getLogger("cigma_ray.models.hf.common")
logger.addHandler(handler)
logger.setLevel(logging.INFO)
open(f"{go}.ready-{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.005)
loaded = load(ModelSpec(f"hf:{url}", classes=("cat", "red bus", "red car")))
total = sum(float(p.double().sum()) for p in loaded.adapter.model.parameters())
print(json.dumps({"copies": copies, "weights": loaded.fingerprint["weights"], "sum": total}))
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The server, its client settings, and a bucket holding a tiny LLaVA saved by save_pretrained."""
    empty = tmp_path_factory.mktemp("aws") / "empty"
    empty.write_text("")
    model = SAVERS["llava"](str(tmp_path_factory.mktemp("llava") / "llava"))
    with moto_s3() as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY)
        client.create_bucket(Bucket="models")
        for name in os.listdir(model):
            client.upload_file(os.path.join(model, name), "models", f"llava/{name}")
        yield {"settings": aws_env(endpoint, str(empty)), "client": client, "model": model}


@pytest.fixture
def s3_env(store, monkeypatch):
    for k, v in store["settings"].items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    yield store
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.timeout(300)
def test_two_replicas_of_a_node_copy_a_model_once_and_load_the_same_files(store, tmp_path):
    cache = tmp_path / "cache"
    go = tmp_path / "go"
    env = subprocess_env(store["settings"], CIGMA_RAY_CACHE=str(cache), PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, "s3://models/llava", str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while len([n for n in os.listdir(tmp_path) if n.startswith("go.ready-")]) < 2:  # both imported everything
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a child did not start"
            time.sleep(0.05)
        go.write_text("")
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sum(len(r["copies"]) for r in results) == 1, results  # one process copied, the other waited for it
    assert results[0]["weights"] == results[1]["weights"] and results[0]["sum"] == results[1]["sum"]
    models = cache / "models"
    copies = sorted(n for n in os.listdir(models) if not n.endswith(".lock"))
    assert len(copies) == 1, copies  # the final directory only: no temporary one is left
    local = models / copies[0]
    assert sorted(os.listdir(local)) == sorted(os.listdir(store["model"]) + [".complete"])
    for name in os.listdir(store["model"]):
        assert (local / name).read_bytes() == open(os.path.join(store["model"], name), "rb").read(), name


def test_a_copy_cut_short_is_redone_and_the_model_type_is_checked_before_any_weight_is_copied(s3_env, tmp_path,
                                                                                               monkeypatch):
    from cigma_ray.models.hf.common import copy_to_cache

    monkeypatch.setenv("CIGMA_RAY_CACHE", str(tmp_path / "cache"))
    url = "s3://models/llava"
    key = os.path.basename(copy_to_cache(url))  # a first copy, then simulate one cut short before its rename
    models = tmp_path / "cache" / "models"
    os.rename(models / key, models / f"{key}.tmp-crashed")
    os.remove(models / f"{key}.tmp-crashed" / ".complete")
    local = copy_to_cache(url)
    assert os.path.isfile(os.path.join(local, ".complete"))
    assert sorted(n for n in os.listdir(models)) == [key, f"{key}.lock"]

    client = s3_env["client"]
    client.put_object(Bucket="models", Key="qwen/config.json", Body=json.dumps({"model_type": "qwen2_vl"}).encode())
    client.put_object(Bucket="models", Key="qwen/model.safetensors", Body=b"\0" * 1024)
    with pytest.raises(ModelError, match="model_type 'qwen2_vl', which cigma-ray has no adapter for"):
        load(ModelSpec("hf:s3://models/qwen", classes=CLASSES))
    assert [n for n in os.listdir(models) if not n.endswith(".lock")] == [key]  # nothing of it was copied
