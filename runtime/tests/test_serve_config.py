"""cair-serve's settings: builder arguments as `serve run key=value` strings or YAML scalars (no Ray needed)."""

from pathlib import Path

import pytest

from cair_runtime.errors import InvalidInputError
from cair_runtime.serve.config import ScalingConfig, ServiceConfig, as_args, parse_config

DEPLOY = Path(__file__).resolve().parents[2] / "serving"


def test_strings_and_yaml_scalars_give_the_same_configs():
    from_strings = parse_config({"engine_dir": "e", "max_batch_size": "2", "batch_wait_ms": "5", "providers": "A,B",
                                 "autoscale": "1,4", "replica_gpus": "1", "max_images": "none",
                                 "max_ongoing_images": "8", "queue_wait_s": "3"})
    from_yaml = parse_config({"engine_dir": "e", "max_batch_size": 2, "batch_wait_ms": 5, "providers": ["A", "B"],
                              "autoscale": [1, 4], "replica_gpus": 1, "max_images": None,
                              "max_ongoing_images": 8, "queue_wait_s": 3})
    assert from_strings == from_yaml
    service, scaling = from_strings
    assert service.max_batch_size == 2 and service.providers == ("A", "B") and scaling.autoscale == (1, 4)
    assert parse_config(as_args(service, scaling)) == (service, scaling)


def test_defaults_and_refusals():
    assert parse_config({"engine_dir": "e"}) == (ServiceConfig("e"), ScalingConfig())
    for args, needle in (({"engine_dir": "e", "max_batch": 2}, "unknown argument(s) max_batch"),
                         ({}, "engine_dir is required"),
                         ({"engine_dir": "e", "replicas": "two"}, "replicas 'two' is not an integer"),
                         ({"engine_dir": "e", "replicas": 1.5}, "not an integer"),
                         ({"engine_dir": "e", "threads": None}, "threads needs a value"),
                         ({"engine_dir": "e", "autoscale": "3,1"}, "autoscale 3,1"),
                         ({"engine_dir": "e", "request_timeout_s": "nan"}, "request_timeout_s nan"),
                         ({"engine_dir": "e", "max_steps": 0, "max_ongoing_requests": 0}, "max_ongoing_requests 0"),
                         ({"engine_dir": "e", "body_timeout_s": 0}, "body_timeout_s 0.0 must be positive"),
                         ({"engine_dir": "e", "autoscale": "1,4"}, "autoscale needs max_ongoing_images")):
        with pytest.raises(InvalidInputError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            parse_config(args)


def test_the_shipped_serve_config_parses():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    service, _ = parse_config(config["applications"][0]["args"])
    assert service.backend == "onnxruntime"
    rayservice = yaml.safe_load((DEPLOY / "rayservice_gpu.yaml").read_text())
    service, _ = parse_config(yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"])
    assert service.backend == "tensorrt"


def test_share_weights_is_a_boolean_setting():
    service, _ = parse_config({"engine_dir": "e", "share_weights": "true"})
    assert service.share_weights is True
    assert parse_config({"engine_dir": "e", "share_weights": False})[0].share_weights is False
    with pytest.raises(InvalidInputError, match="share_weights 'maybe' is not true or false"):
        parse_config({"engine_dir": "e", "share_weights": "maybe"})


def test_serve_slots_leave_room_beside_the_images_held():
    """Serve's per-replica limit sits above the replica's own image limit, so requests wait in the replica
    (where a freed slot is taken at once) rather than at the proxy, and probes and slow bodies find room."""
    from cair_runtime.serve.config import CONNECTION_HEADROOM, MAX_DERIVED_IMAGES, serve_slots

    assert serve_slots(ScalingConfig()) == MAX_DERIVED_IMAGES + CONNECTION_HEADROOM
    assert serve_slots(ScalingConfig(max_ongoing_images=24)) == 24 + CONNECTION_HEADROOM
    assert serve_slots(ScalingConfig(max_ongoing_images=24, max_ongoing_requests=30)) == 30


def test_precision_is_the_openvino_backends_choice():
    service, _ = parse_config({"engine_dir": "e", "backend": "openvino", "precision": "bf16"})
    assert service.precision == "bf16"
    assert parse_config({"engine_dir": "e", "backend": "openvino"})[0].precision is None  # auto
    for args, needle in (({"engine_dir": "e", "precision": "bf16"}, "openvino backend's choice"),
                         ({"engine_dir": "e", "backend": "openvino", "precision": "fp16"}, "must be one of")):
        with pytest.raises(InvalidInputError, match=needle):
            parse_config(args)
