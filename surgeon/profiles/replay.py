"""Exact partial re-execution of an instrumented graph, for the profiler's layer sensitivity
(see :func:`surgeon.profiles.collect.profile`)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch


class Replay:
    """Exact partial re-execution of an instrumented graph (layer sensitivity).

    A sensitivity forward changes one site only; every node that does not depend on that site's
    output computes exactly what the dense forward computed. :meth:`dense` runs the whole graph
    node by node (the same ops, in the same order, on the same values as the generated forward:
    the results are bit-identical) and keeps the values that some site's dependents read;
    :meth:`suffix` then re-executes only the nodes downstream of site ``i`` on those values —
    on average half a forward instead of a whole one, with bit-identical outputs. Graphs with
    mutating ops (in-place, buffer updates) or other node kinds are not replayed (:meth:`of` returns None).
    """

    def __init__(self, gm: torch.fx.GraphModule, site_nodes: Sequence[torch.fx.Node]) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        pos = {n: k for k, n in enumerate(self.nodes)}
        self.out_node = next(n for n in self.nodes if n.op == "output")
        self.steps: list[list[torch.fx.Node]] = []
        self.step_free: list[list[list[torch.fx.Node]]] = []  # per site: values dead after each step
        keep: set[torch.fx.Node] = set()
        for sn in site_nodes:
            desc = {sn}
            steps = [sn]
            for n in self.nodes[pos[sn] + 1:]:
                if n.op != "output" and any(a in desc for a in n.all_input_nodes):
                    desc.add(n)
                    steps.append(n)
            for n in steps + [self.out_node]:
                keep.update(a for a in n.all_input_nodes if a not in desc)
            self.steps.append(steps)
            # free each value after its last reader, as the generated forward does (holding every
            # intermediate makes each allocation fresh, page-faulted memory: slower than a full forward)
            last_in: dict[torch.fx.Node, int] = {}
            for k, n in enumerate(steps):
                for a in n.all_input_nodes:
                    last_in[a] = k
            out_inputs = set(self.out_node.all_input_nodes)
            free: list[list[torch.fx.Node]] = [[] for _ in steps]
            for a, k in last_in.items():
                if a not in out_inputs:
                    free[k].append(a)
            self.step_free.append(free)
        self.keep = keep
        last: dict[torch.fx.Node, int] = {}
        for k, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last[a] = k
        self.free_after: list[list[torch.fx.Node]] = [[] for _ in self.nodes]
        for n, k in last.items():
            if n not in keep:
                self.free_after[k].append(n)

    @classmethod
    def of(cls, gm: torch.fx.GraphModule) -> Optional["Replay"]:
        rep = gm.meta.get("surgeon_replay")
        if rep is None:
            sites = gm.meta.get("surgeon_site_nodes")
            if not sites or any(n.op not in ("placeholder", "get_attr", "call_function", "call_module", "output") or
                                (n.op == "call_function" and _mutates(n.target)) for n in gm.graph.nodes):
                return None
            rep = cls(gm, sites)
            gm.meta["surgeon_replay"] = rep
        return rep

    def _exec(self, n: torch.fx.Node, env: dict[torch.fx.Node, Any]) -> Any:
        if n.op == "get_attr":
            obj: Any = self.gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            return obj
        args = torch.fx.node.map_arg(n.args, env.__getitem__)
        kwargs = torch.fx.node.map_arg(n.kwargs, env.__getitem__)
        if n.op == "call_module":  # e.g. torch.export's input guards (``_guards_fn``)
            return self.gm.get_submodule(str(n.target))(*args, **kwargs)
        return n.target(*args, **kwargs)

    def _output(self, env: dict[torch.fx.Node, Any]) -> Any:
        out = torch.fx.node.map_arg(self.out_node.args[0], env.__getitem__)
        return self.gm.graph.process_outputs(out)

    def dense(self, inputs: tuple) -> tuple[Any, dict[torch.fx.Node, Any]]:
        """The forward's output and the kept values (what :meth:`suffix` reads)."""
        args = iter(self.gm.graph.process_inputs(*inputs))
        env: dict[torch.fx.Node, Any] = {}
        for k, n in enumerate(self.nodes):
            if n.op == "output":
                out = self._output(env)
                break
            env[n] = next(args) if n.op == "placeholder" else self._exec(n, env)
            for d in self.free_after[k]:
                env.pop(d, None)
        return out, {n: v for n, v in env.items() if n in self.keep}

    def suffix(self, i: int, kept: dict[torch.fx.Node, Any]) -> Any:
        """The forward's output when only the nodes downstream of site ``i`` are re-executed."""
        env = dict(kept)
        for n, dead in zip(self.steps[i], self.step_free[i]):
            env[n] = self._exec(n, env)
            for d in dead:
                del env[d]
        return self._output(env)


def _mutates(target: Any) -> bool:
    schema = getattr(target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)
