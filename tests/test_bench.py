"""tools/bench.py's XL/2 comparison compares like with like: its re-created released path computes
selfflow's function, and selfflow's side of it does the work of each sample's distinct levels only
(no timing asserted)."""

from argparse import Namespace

from tools import bench as tool_module


def test_official_cases_compare_the_same_function_and_selfflow_does_fewer_flops():
    bench = tool_module
    args = Namespace(
        device="cpu",
        dtype="fp32",
        official_width=32,
        official_depth=1,
        official_heads=2,
        official_batch=2,
        compile=False,
        profile=False,
        warmup=0,
        iters=1,
    )
    for with_grad in (True, False):
        records = {
            r["name"].split("/")[1]: r for r in bench.case_official(args, with_grad=with_grad)
        }
        assert records["selfflow"]["max_abs_difference_to_released"] < 1e-5
        # the released path runs the timestep and adaLN MLPs on 256 tokens per sample, selfflow on
        # 2 levels
        assert records["released"]["flops_per_step"] > 1.3 * records["selfflow"]["flops_per_step"]
