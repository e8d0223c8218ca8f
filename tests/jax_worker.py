"""A JAX process that bootstraps through the fsrdzv cluster plug-in and checks a cross-process all-gather."""

from __future__ import annotations

import json

import jax

import fsrdzv.jax  # noqa: F401 - registers the plug-in

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # type: ignore[no-untyped-call]
jax.distributed.initialize(cluster_detection_method="fsrdzv", initialization_timeout=60)

import jax.numpy as jnp  # noqa: E402 - after initialize, as JAX asks
from jax.experimental import multihost_utils  # noqa: E402

gathered = multihost_utils.process_allgather(jnp.array([jax.process_index() + 1]))
print(json.dumps({"index": jax.process_index(), "count": jax.process_count(), "sum": int(gathered.sum())}), flush=True)
jax.distributed.shutdown()  # type: ignore[no-untyped-call]
