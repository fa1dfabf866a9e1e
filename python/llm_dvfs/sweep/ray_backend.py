"""The Ray backend of a parallel sweep (``--ray auto|local|ray://HOST:PORT``).

One Ray actor per GPU (``num_gpus`` = ``gpus_per_model``) on every node of the cluster, each
holding a :class:`~llm_dvfs.sweep.worker.CellWorker`; the scheduler of
:mod:`llm_dvfs.sweep.parallel` hands them cells (``run.remote(index)``) and records what comes
back, in the driver's run directory (workers write nothing: no shared filesystem is needed).

* ``local``: a Ray cluster of this machine is started (``ray.init(num_gpus=N)``, N = the GPUs
  of ``--gpus``, or all that NVML sees: an emulated GPU counts as Ray's GPU) and shut down at the
  end. An actor's Ray GPU id *i* is the *i*-th of those GPUs, pinned by UUID.
* ``auto`` / ``ray://…`` / ``HOST:PORT``: an existing cluster (``ray start --head --num-gpus …``
  on each node); an actor uses the GPU(s) Ray assigned it (``ray.get_gpu_ids()``, which Ray has
  put in ``CUDA_VISIBLE_DEVICES``). The actors need llm_dvfs installed on every node.

Environment variables ``LLM_DVFS_*``, ``FAKE_NVML_*`` and ``FAKE_CUDA_*`` are passed to the
actors (``runtime_env``): the clock opt-in, library paths, and the emulator in tests.

A lost actor (its process killed, its node gone) is reported as ``dead`` (``RayActorError``);
the scheduler re-queues its cell, and the actor's watchdog (a process on its node) restores its
GPU. Actors are not restarted (``max_restarts=0``): a GPU that failed stays out of the run.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from llm_dvfs import errors
from llm_dvfs.sweep.plan import Plan

log = logging.getLogger("llm_dvfs.sweep.ray_backend")

#: Prefixes of the environment variables the actors get from the driver.
FORWARDED_ENV_PREFIXES = ("LLM_DVFS_", "FAKE_NVML_", "FAKE_CUDA_")


class _Actor:
    """The body of a Ray actor: pin to the GPU(s) Ray assigned, then a CellWorker."""

    def __init__(self, plan: Any, worker_id: int, uuids: Optional[list[str]]) -> None:
        import ray

        ids = [int(i) for i in ray.get_gpu_ids()]
        if uuids is not None:  # local cluster: Ray's GPU i is the i-th GPU of the driver's list
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(uuids[i] for i in ids)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in ids)
        from llm_dvfs.sweep.worker import CellWorker

        self.w = CellWorker(plan, worker_id, ids)

    def describe(self) -> dict[str, Any]:
        return self.w.describe()

    def run(self, index: int) -> dict[str, Any]:
        return self.w.run(index)

    def close(self) -> None:
        self.w.close()


class RayBackend:
    """:class:`~llm_dvfs.sweep.parallel.Backend` on Ray actors (module docstring).

    Raises:
        ConfigError: Ray is not installed (says how to install it), or the cluster has no GPU.
    """

    def __init__(self, plan: Plan) -> None:
        try:
            import ray
        except ImportError:
            raise errors.ConfigError("--ray needs Ray, which is not installed: pip install 'llm_dvfs[ray]'") from None
        self.ray = ray
        self.plan = plan
        self.own_cluster = False
        self.actors: dict[int, Any] = {}
        self.inflight: dict[Any, tuple[str, int]] = {}   # ObjectRef -> (what, worker id)
        self.uuids: Optional[list[str]] = None

    def _init(self) -> int:
        ray, plan = self.ray, self.plan
        k = plan.config.gpus_per_model
        env = {k_: v for k_, v in os.environ.items() if k_.startswith(FORWARDED_ENV_PREFIXES)}
        addr = plan.config.ray
        local_gpus = [g for w in plan.workers for g in w.gpus] or list(plan.gpus)
        if not ray.is_initialized():
            if addr == "local":
                if not local_gpus:
                    raise errors.ConfigError("--ray local: this machine has no GPU that NVML sees")
                self.uuids = [g.uuid for g in local_gpus]
                ray.init(num_gpus=len(local_gpus), num_cpus=max(os.cpu_count() or 1, len(local_gpus)),
                         include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
            else:
                ray.init(address=addr, log_to_driver=False, runtime_env={"env_vars": env})
            self.own_cluster = True
        elif addr == "local":  # a cluster this process started already (tests)
            self.uuids = [g.uuid for g in local_gpus]
        n_gpus = int(ray.cluster_resources().get("GPU", 0))
        if n_gpus < k:
            raise errors.ConfigError(f"--ray: the cluster has {n_gpus} GPU(s); {k} are needed per model")
        n = len(plan.workers) if plan.workers and plan.workers[0].gpus else n_gpus // k
        return min(n, n_gpus // k)

    def start(self) -> list[int]:
        n = self._init()
        # num_cpus=0: an actor's place is decided by its GPUs alone (its CPU work is its model's)
        cls = self.ray.remote(_Actor).options(num_gpus=self.plan.config.gpus_per_model, num_cpus=0,
                                             max_restarts=0, max_task_retries=0)
        for wid in range(n):
            a = cls.remote(self.plan, wid, self.uuids)
            self.actors[wid] = a
            self.inflight[a.describe.remote()] = ("ready", wid)
        log.info("Ray: %d actor(s) on a cluster of %s", n, self.ray.cluster_resources())
        return list(self.actors)

    def submit(self, wid: int, index: int) -> None:
        self.inflight[self.actors[wid].run.remote(index)] = ("done", wid)

    def events(self, timeout_s: float) -> list[tuple[Any, ...]]:
        from ray.exceptions import RayActorError, RayTaskError

        if not self.inflight:
            return []
        ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=timeout_s)
        out: list[tuple[Any, ...]] = []
        for ref in ready:
            what, wid = self.inflight.pop(ref)
            try:
                res = self.ray.get(ref)
            except RayActorError as e:  # the actor's process or node is gone (or never started)
                out.append(("dead" if what == "done" else "error", wid, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"))
                continue
            except RayTaskError as e:  # the cell raised in the actor (-1: the scheduler knows which)
                out.append(("failed", wid, -1, str(e)) if what == "done" else ("error", wid, str(e)))
                continue
            out.append((what, wid, res))
        return out

    def stop(self, graceful: bool) -> None:
        ray = self.ray
        if graceful:
            refs = [a.close.remote() for a in self.actors.values()]
            try:
                ray.wait(refs, num_returns=len(refs), timeout=30)
            except Exception:  # noqa: BLE001 - a dead actor: its watchdog restored its GPU
                pass
        for a in self.actors.values():
            try:
                ray.kill(a)  # the process ends; its clock watchdog restores the GPU
            except Exception:  # noqa: BLE001
                pass
        self.actors.clear()
        self.inflight.clear()
        if self.own_cluster:
            ray.shutdown()


__all__ = ["RayBackend", "FORWARDED_ENV_PREFIXES"]
