"""infer.profile_batch / sft.profile_steps / rl.profile_steps write profile.txt: kernel time against wall time, the
top kernels (ops without a GPU), the ops by input shape and the ops by CPU time."""
import torch


def test_profile_names_its_tables_and_the_shapes(tmp_path):
    from flare_exp.profiling import Profiled

    profiled = Profiled()
    profiled.start()
    x = torch.randn(48, 40)
    for _ in range(3):
        (x @ x.T).relu()
    wall = profiled.stop(tmp_path / "p" / "profile.txt", "batch 2")
    text = (tmp_path / "p" / "profile.txt").read_text()
    assert text.startswith(f"batch 2: wall {wall:.3f} s, GPU kernels 0.000 s")
    assert text.index("## ops (no GPU)") < text.index("## ops by input shape") < text.index("## ops by CPU time")
    assert text.endswith("## GPU idle: what the host was doing\n(no GPU kernels)")
    shapes = text[text.index("## ops by input shape"):text.index("## ops by CPU time")]
    assert "aten::mm" in shapes and "[[48, 40], [40, 48]]" in shapes


def test_a_table_torch_cannot_draw_is_named_not_raised():
    """torch's table code asserts on some mixes of rows (kernel-less op rows with GPU time, seen on an H100): the
    profile is a diagnostic, so the run goes on with the reason in the file."""
    from flare_exp.profiling import drawn

    def broken():
        raise AssertionError("Expected time_us == 0 but got 338650.6")

    assert drawn(broken) == "(not drawn: AssertionError: Expected time_us == 0 but got 338650.6)"
    assert drawn(lambda: "table") == "table"


def test_regions_on_the_gpus_timeline_are_not_counted_as_kernels():
    """torch.compile marks each compiled graph's call on the GPU's timeline: summed with the kernels inside it,
    the header said 1.947 s of kernels in a 1.375 s batch (busy 142%) on an H100."""
    from types import SimpleNamespace

    from flare_exp.profiling import annotation

    assert annotation(SimpleNamespace(key="## Call CompiledFxGraph fxk4rs5ovz64r3tc5bi2wmutbmua ##"))
    assert annotation(SimpleNamespace(key="decode step", is_user_annotation=True))
    assert not annotation(SimpleNamespace(key="nvjet_sm90_tst_128x32_64x10_4x1_v_bz_TNT", is_user_annotation=False))


def test_the_gpus_idle_time_is_given_to_our_innermost_region_and_the_launching_threads_ops():
    """Kernels at 0-2, 10-11 and 30-31 ms leave two gaps (8 + 19 ms), and 1 ms after them; the launching thread (the one making CUDA
    runtime calls) was in a copy for 4 ms of them and launching for 0.8 ms; another thread's op does not count;
    a region nested in another gets the time."""
    from types import SimpleNamespace as NS

    from flare_exp.profile_gaps import gap_table

    def ev(name, start, end, thread=1, gpu=False, children=()):
        return NS(name=name, key=name, time_range=NS(start=start * 100, end=end * 100), thread=thread, gpu=gpu,
                  cpu_children=list(children), is_user_annotation=name.startswith("flare_exp:"))

    events = [ev("k1", 0, 10, 0, True), ev("k2", 10, 20, 0, True), ev("k3", 100, 110, 0, True),
              ev("k4", 300, 310, 0, True), ev("## Call CompiledFxGraph x ##", 0, 400, 0, True),
              ev("cudaLaunchKernel", 0, 1), ev("cudaLaunchKernel", 95, 99), ev("cudaLaunchKernel", 295, 299),
              ev("aten::copy_", 30, 70), ev("flare_exp: decode steps", 0, 120, children=[1]),
              ev("flare_exp: detokenize", 120, 320, children=[1]), ev("flare_exp: inner", 200, 210, children=[1]),
              ev("aten::to", 20, 300, thread=2)]
    from flare_exp.profiling import annotation

    text = gap_table(events, lambda e: e.gpu, annotation)
    # the thread's first op starts with k1; its last region ends 1 ms after k4
    assert text.startswith("28.0 ms idle in 3 gaps of >= 50 us"), text
    assert "it ran ops in 4.8 ms of them" in text
    lines = [line.split(None, 1) for line in text.splitlines() if line[:10].strip().replace(".", "").isdigit()]
    table = {name: float(ms) for ms, name in lines}
    assert table == {"flare_exp: detokenize": 18.0, "flare_exp: decode steps": 9.0, "flare_exp: inner": 1.0,
                     "decode steps: aten::copy_": 4.0, "decode steps: cudaLaunchKernel": 0.4,
                     "detokenize: cudaLaunchKernel": 0.4}, text
    assert "aten::to" not in text
    # idle before the first kernel, while the launching thread runs, counts too
    events += [ev("flare_exp: batch input", -10, 0, children=[1])]
    text = gap_table(events, lambda e: e.gpu, annotation)
    assert text.startswith("29.0 ms idle in 4 gaps of >= 50 us"), text
    assert "     1.0  flare_exp: batch input" in text, text
