"""What the service hands sglang.Engine for multi-node setups (ServerArgs itself is checked by make test-sglang)."""

import pytest

from service.config import ServiceConfig, parse_args
from service.engines.sglang_compat import engine_kwargs


def test_multi_node_arguments_reach_sglang_on_rank_zero():
    config = parse_args(["--model", "/models/m", "--tp-size", "16", "--nnodes", "2", "--dist-init-addr", "10.0.0.1:5000"])
    kwargs = engine_kwargs(config)
    assert (kwargs["tp_size"], kwargs["nnodes"], kwargs["node_rank"], kwargs["dist_init_addr"]) == (16, 2, 0, "10.0.0.1:5000")
    assert "nnodes" not in engine_kwargs(ServiceConfig(model="/models/m"))


def test_other_ranks_are_sglang_workers_not_services():
    with pytest.raises(ValueError, match="rank 0"):
        engine_kwargs(ServiceConfig(model="/models/m", nnodes=2, node_rank=1, dist_init_addr="10.0.0.1:5000"))
