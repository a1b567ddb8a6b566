"""The committed generated code must match protos/inference.proto, and import package-qualified."""

from pathlib import Path

from protos.generate import ROOT, generate


def test_generated_code_is_not_stale(tmp_path):
    fresh = generate(tmp_path)
    assert {p.name for p in fresh} == {"inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py"}
    for path in fresh:
        committed = ROOT / "protos" / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run `python -m protos.generate` and commit the result")


def test_stubs_import_and_round_trip():
    from protos import inference_pb2, inference_pb2_grpc

    request = inference_pb2.GenerateRequest(
        request_id="r1", prompt="Hello", tier="long",
        sampling=inference_pb2.SamplingParams(max_tokens=8, temperature=0.0, stop=["\n"]))
    decoded = inference_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert decoded.WhichOneof("input") == "prompt" and decoded.sampling.HasField("temperature")
    assert not decoded.sampling.HasField("top_p")  # unset optional -> server default
    assert hasattr(inference_pb2_grpc, "add_InferenceServicer_to_server")
    assert Path(inference_pb2.__file__).parent == ROOT / "protos"
