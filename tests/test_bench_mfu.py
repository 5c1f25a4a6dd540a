"""The bench does not print a guess as a measurement: MFU takes the peak of the card it ran on (or says it is
unknown), and a missing parameter count or an unknown card is printed as unknown, never as an MFU of 0."""
import pytest

from bench.common import model_flops_utilization, peak_bf16_tflops
from bench.report import sft_row


@pytest.mark.parametrize("device,peak", [
    ("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
    ("NVIDIA L40", None), ("NVIDIA GeForce RTX 4090", None), ("cpu", None),
])
def test_peak_is_the_cards(device, peak):
    assert peak_bf16_tflops(device) == peak


def test_mfu_by_hand():
    # Qwen3-VL-4B's 4.44 B parameters at 13,000 tokens/s: 6 x 4.44e9 x 13,000 = 3.463e14 FLOP/s
    h200 = model_flops_utilization(4_440_000_000, 13_000.0, "NVIDIA H200")
    assert h200 == {"mfu": round(3.4632e14 / 989e12, 4), "mfu_peak_tflops": 989.0}
    assert model_flops_utilization(4_440_000_000, 13_000.0, "NVIDIA A100-SXM4-80GB")["mfu"] == \
        round(3.4632e14 / 312e12, 4)
    # a card outside the table, with its peak given
    assert model_flops_utilization(1_000_000_000, 1_000.0, "NVIDIA B300", peak_tflops=600.0)["mfu"] == 0.01


@pytest.mark.parametrize("params,tokens_per_second,device,named", [
    (None, 13_000.0, "NVIDIA H200", "no parameter count"),
    (4_440_000_000, 13_000.0, "cpu", "no bf16 peak known for 'cpu' (pass --peak-tflops)"),
    (4_440_000_000, None, "NVIDIA H200", "no tokens/s"),
])
def test_what_is_not_known_is_said(params, tokens_per_second, device, named):
    result = model_flops_utilization(params, tokens_per_second, device)
    assert result["mfu"] is None and named in result["mfu_note"] and result["mfu_note"].startswith("unknown")


def test_report_prints_unknown_not_zero():
    row = {"dataset": "IU_XRay", "backend": "hf", "batch": 8, "tokens_per_second_median": 1234.0,
           "step_seconds_median": 1.0, "device": "cpu", "mfu": None, "params": None}
    assert sft_row(row)[8] == "unknown"
    assert sft_row({**row, "mfu": 0.35024})[8] == "0.350"
    assert sft_row({k: v for k, v in row.items() if k != "mfu"})[8] == "unknown"  # older results without it
