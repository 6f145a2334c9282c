"""A teacher off the trainer: frozen teacher replicas as Ray actors, on this machine or on a cluster.

Shape legend:
    b  sequences
    t  prompt + response tokens
    d  teacher width
    v  vocabulary

The trainer sends token ids `[b, t]`, the attention mask and the capture points the objective needs; a replica runs the
same early-exit pass an in-process teacher runs (`hidden_states`) and sends back the states at those points, in the
teacher's dtype, from the last prompt position on (`[b, t - start, d]`, `start = prompt_length - 1`): every term reads
the response positions and the position before the first response token only, so the prompt's states stay on the
replica, and the trainer fills their place with zeros that every mask drops. A token-space term asks for the final
normed state (`norm`) too, and the trainer forms the teacher's logits from it chunk by chunk with the teacher's LM head
`[v, d]`, fetched once: the only part of the teacher the trainer holds, so every token objective is as exact as with the
teacher in-process (NeMo-RL and verl's Nitrobrew ship pre-head states for the same reason: full logits are ~v/d times
larger). With a calibrated OPRD-Bridge the trainer sends the Bridge's teacher side (each pair's mean `[d]` and basis
`[d, r]`) with the request, and the replica sends each pair's coordinates `[b, t - start, r]` instead of its states:
r numbers per token and pair instead of d (8 instead of 576 for SmolLM2), computed by the same function, on the same
full-length states, as the trainer would compute them, so the losses are the same to the bit.

Requests go to the replicas in turn, one whole request per replica, so a replica computes exactly what an
in-process teacher with the same thread count computes (bitwise). A replica that dies has its request retried on
the next live one; with none left `TeacherUnavailable` says which teacher and where. Replicas are named actors
(`<name>-<i>` in the `oprd` namespace): a run re-attaches to running replicas of the same name after checking, by a
fingerprint of the model they were built from, that they serve the teacher its config names.

Ray is an optional dependency (`pip install 'oprd[ray]'`), imported only when a remote teacher is configured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from oprd.losses.hidden import basis_coordinates
from oprd.losses.lm_head import Head
from oprd.models.capture import Point
from oprd.models.spec import ModelSpec, load_model
from oprd.rollout.engine import HFGenerateEngine
from oprd.rollout.sampling import Rollout, RolloutConfig

log = logging.getLogger(__name__)

NAMESPACE = "oprd"


@dataclass(frozen=True)
class RemoteTeacherConfig:
    """Where the teacher's replicas run and how many there are."""

    replicas: int = 1
    """Teacher replicas (Ray actors); requests go to them in turn."""
    address: str = "auto"
    """Ray cluster: `auto` joins the cluster this machine runs (`ray start`, or `RAY_ADDRESS`) or starts a local
    one; otherwise the address of a running cluster (`host:6379`, `ray://host:10001`)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Ray resources per replica (`num_gpus: 1`, `num_cpus: 4`, custom resources); default one CPU."""
    threads: int | None = None
    """Torch threads in each replica; None: the trainer's own count (the same kernels, so the same numbers)."""
    name: str = "oprd-teacher"
    """Replica actor names (`<name>-0`, `<name>-1`, ...): a run re-attaches to running replicas of this name."""
    detached: bool = False
    """Keep the replicas running after the trainer exits (a resumed run re-attaches to them); stop them with
    `ray.kill(ray.get_actor('<name>-0', namespace='oprd'))`."""
    timeout_s: float = 600.0
    """Seconds to wait for one teacher request (a pass over one batch) before the replica counts as lost."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}.")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}.")
        if self.address != "auto":
            host_port(self.address)  # a malformed address is named before any model loads
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}.")


class TeacherUnavailable(ConnectionError):
    """No replica of the remote teacher is left (or none could be reached)."""


@contextlib.contextmanager
def saved_if_teacher_lost(trainer) -> Iterator[None]:
    """A remote teacher with no replica left: save the run as it stands before this step, then stop."""
    try:
        yield
    except TeacherUnavailable as err:
        step = trainer.global_step
        path = Path(trainer.default_root_dir) / f"teacher-lost-step{step}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        raise TeacherUnavailable(f"{err} The run before step {step} is saved in {path}.") from err


def fingerprint(spec: ModelSpec, config) -> str:
    """What a replica serves, as the trainer's config names it: the model spec and the model config, hashed.

    Computed from the config alone, so the trainer can check a running replica without loading any weights.
    """
    named = {"spec": dataclasses.asdict(spec), "config": config.to_dict()}
    return hashlib.sha256(json.dumps(named, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of every weight (names, dtypes, shapes, bytes): replicas built from one spec must agree on it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


Projection = dict[str, tuple[Point, Tensor, Tensor]]
"""The Bridge's teacher side: pair label -> (teacher point, mean `[d]`, basis `[d, r]`)."""


class TeacherReplica:
    """One frozen teacher inside a Ray actor (`ray.remote(TeacherReplica)`): its passes, head and samples.

    Args:
        spec, config: the teacher as the trainer's config names it (`load_model` builds it the same way).
        tokenizer: the pair's tokenizer (formats width-pruning prompts; decodes nothing).
        threads: torch threads for its passes.
    """

    def __init__(self, spec: ModelSpec, config, tokenizer, threads: int) -> None:
        torch.set_num_threads(threads)
        self.layers_path, self.tokenizer = spec.layers_path, tokenizer
        self.model = load_model(spec, config, tokenizer).eval().requires_grad_(False)
        self.identity = {"fingerprint": fingerprint(spec, config), "weights": weights_digest(self.model)}

    def describe(self) -> dict[str, object]:
        """The fingerprint of the model it was built from, its weights' digest, and its process id."""
        return {**self.identity, "pid": os.getpid()}

    @torch.no_grad()
    def states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        points: Sequence[Point],
        start: int = 0,
        projection: Projection | None = None,
    ) -> tuple[dict[Point, Tensor], dict[str, Tensor]]:
        """The teacher's states at `points` from position `start` on, `[b, t - start, d]`, and per `projection` label
        its teacher state's coordinates in the Bridge's basis, `[b, t - start, r]`, computed here as the trainer would
        compute them (copies: only they are sent); the pass stops after the deepest point."""
        from oprd.models.capture import hidden_states

        projection = projection or {}
        wanted = list(dict.fromkeys([*points, *(point for point, _, _ in projection.values())]))
        states = hidden_states(self.model, wanted, self.layers_path, input_ids, attention_mask)
        return replica_payload(states, points, start, projection)

    def head(self) -> tuple[Tensor, Tensor | None]:
        """The LM head's `(weight [v, d], bias [v] or None)`."""
        head = Head.of(self.model.get_output_embeddings())
        return head.weight.detach().clone(), None if head.bias is None else head.bias.detach().clone()

    def input_embedding(self) -> Tensor:
        """The input embedding's weight `[v, d]`."""
        return self.model.get_input_embeddings().weight.detach().clone()

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, config: RolloutConfig, seed: int | None) -> Rollout:
        """The teacher's own responses (sequence-level KD, or scoring the teacher)."""
        return HFGenerateEngine().generate(self.model, self.tokenizer, input_ids, attention_mask, config, seed=seed)


def first_read_position(roll: Rollout) -> int:
    """The first position any term reads: the last prompt position, whose output predicts the first response token
    (prompts are left-padded to one width, so responses start at the same column in every row)."""
    return max(roll.prompt_length - 1, 0)


def replica_payload(
    states: dict[Point, Tensor], points: Sequence[Point], start: int, projection: Projection
) -> tuple[dict[Point, Tensor], dict[str, Tensor]]:
    """What a replica sends for the teacher's `states`: those at `points`, and per `projection` label the coordinates
    of its teacher state in the Bridge's basis, each from position `start` on."""
    coordinates = {label: basis_coordinates(states[p], mean, basis) for label, (p, mean, basis) in projection.items()}
    return shipped({p: states[p] for p in points}, start), shipped(coordinates, start)


def shipped(states: dict[Point, Tensor], start: int) -> dict[Point, Tensor]:
    """What a replica sends: each state from position `start` on, copied so that only that part is serialised."""
    return {point: state[:, start:].clone() for point, state in states.items()}


def restored(state: Tensor, start: int) -> Tensor:
    """A shipped state `[b, t - start, d]` back at full length `[b, t, d]`, zeros before `start`."""
    if start == 0:
        return state
    return torch.cat([state.new_zeros(state.shape[0], start, *state.shape[2:]), state], dim=1)


def _ray():
    try:
        import ray
    except ImportError as err:
        raise ImportError(
            "A remote teacher (model.teacher_placement.remote) runs on Ray, which is not installed: pip install "
            "'oprd[ray]'."
        ) from err
    return ray


def connect(address: str) -> None:
    """Join the Ray cluster at `address` (`auto`: this machine's, started if none runs); a no-op when connected.

    Raises:
        TeacherUnavailable: the address cannot be reached (before any model loads).
    """
    ray = _ray()
    if ray.is_initialized():
        return
    if address != "auto":
        _check_reachable(address)
    try:
        ray.init(
            address=None if address == "auto" else address,
            namespace=NAMESPACE,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise _unreachable(address, str(err).splitlines()[0]) from err


def host_port(address: str) -> tuple[str, int]:
    """`host:port` or `ray://host:port` -> (host, port).

    Raises:
        ValueError: naming the setting and the forms it takes.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(
            f"model.teacher_placement.remote.address {address!r} is not `auto`, `host:port` or `ray://host:port` "
            "(e.g. 10.0.0.5:6379)."
        )
    return host, int(port)


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on an address nothing listens at (Ray itself retries a missing cluster for minutes)."""
    try:
        socket.create_connection(host_port(address), timeout=timeout_s).close()
    except OSError as err:
        raise _unreachable(address, err.strerror or str(err)) from err


def _unreachable(address: str, why: str) -> TeacherUnavailable:
    return TeacherUnavailable(
        f"Cannot reach the Ray cluster at model.teacher_placement.remote.address {address!r} ({why}): start it there "
        "(`ray start --head`) or give its address, or `auto` for a cluster on this machine."
    )


class RemoteTeacher:
    """The frozen teacher as Ray replicas, with the interface of the in-process `FrozenTeacher`.

    Args:
        spec, config: the teacher as the trainer's config names it.
        tokenizer: the pair's tokenizer.
        settings: replicas, cluster address, resources.
    """

    model = None
    """No teacher module lives in the trainer's process."""

    def __init__(self, spec: ModelSpec, config, tokenizer, settings: RemoteTeacherConfig) -> None:
        ray = _ray()
        connect(settings.address)
        self.settings, self.address = settings, settings.address
        self.expected = fingerprint(spec, config)
        threads = settings.threads or torch.get_num_threads()
        options = {"num_cpus": 1, **settings.resources, "namespace": NAMESPACE}
        if settings.detached:
            options["lifetime"] = "detached"
        actor = ray.remote(TeacherReplica)
        self.replicas, self._next, self._head = [], 0, None
        created = []
        for index in range(settings.replicas):
            name = f"{settings.name}-{index}"
            try:
                handle = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:  # none of that name runs: start it
                handle = actor.options(name=name, **options).remote(spec, config, tokenizer, threads)
                created.append(name)
            self.replicas.append((name, handle))
        described = ray.get([handle.describe.remote() for _, handle in self.replicas])
        for (name, _), identity in zip(self.replicas, described, strict=True):
            if identity["fingerprint"] != self.expected:
                raise ValueError(
                    f"Teacher replica {name!r} at {self.address!r} serves another model (fingerprint "
                    f"{identity['fingerprint']}, this run's teacher {self.expected}): stop it (ray.kill) or give this "
                    "run another model.teacher_placement.remote.name."
                )
        digests = {identity["weights"] for identity in described}
        if len(digests) > 1:
            raise ValueError(
                f"The replicas of teacher {settings.name!r} hold different weights ({sorted(digests)}): the same spec "
                "built different models; stop them and start again."
            )
        self.weights = digests.pop()
        self.pids = {name: identity["pid"] for (name, _), identity in zip(self.replicas, described, strict=True)}
        log.info(
            "Remote teacher: %d replica(s) %s at %s (started %s), weights %s.",
            len(self.replicas), [n for n, _ in self.replicas], self.address, created or "none", self.weights,
        )  # fmt: skip

    # ---- what the pair asks of a teacher --------------------------------------------------------------------

    def rest(self, student_device: torch.device) -> None:
        """Nothing to move: the replicas hold the teacher."""

    def states(
        self, roll: Rollout, points: Sequence[Point], layers_path: str | None, device: torch.device
    ) -> dict[Point, Tensor]:
        """The teacher's states at `points` for `roll`'s sequences, on `device`."""
        return self.request_states(roll, points, {}, device)()[0]

    def request_states(
        self, roll: Rollout, points: Sequence[Point], projection: Projection, device: torch.device
    ) -> Callable[[], tuple[dict[Point, Tensor], dict[str, Tensor]]]:
        """The teacher's states at `points` and the Bridge's targets per pair label (`projection`), on `device`: sent
        now, and waited for when the returned function is called, so the trainer runs the student's forward while a
        replica runs the teacher's."""
        ids, mask, start = roll.input_ids.cpu(), roll.attention_mask.cpu(), first_read_position(roll)
        answer = self._request("states", ids, mask, list(points), start, projection)

        def received() -> tuple[dict[Point, Tensor], dict[str, Tensor]]:
            states, targets = answer()
            return (
                {point: restored(state, start).to(device) for point, state in states.items()},
                {label: restored(target, start).to(device) for label, target in targets.items()},
            )

        return received

    def generate(
        self,
        tokenizer,
        input_ids: Tensor,
        attention_mask: Tensor,
        config: RolloutConfig,
        seed: int | None,
        device: torch.device,
        synced: bool = False,
    ) -> Rollout:
        """The teacher's responses to the formatted prompts, on `device` (the replica holds its own tokenizer)."""
        return self._call("generate", input_ids.cpu(), attention_mask.cpu(), config, seed).to(device)

    def head(self, student_device: torch.device) -> Head:
        """The teacher's LM head on the student's device, fetched from a replica once."""
        if self._head is None:
            self._head = Head(*self._call("head"))
        self._head = self._head.to(student_device)
        return self._head

    def input_embedding(self) -> Tensor:
        """The teacher's input embedding weight `[v, d]`, fetched from a replica (on the CPU; not kept)."""
        return self._call("input_embedding")

    # ---- replicas -------------------------------------------------------------------------------------------

    def _call(self, method: str, *args):
        """`method(*args)` on the next live replica; a lost replica is dropped and the request goes to the next."""
        return self._request(method, *args)()

    def _request(self, method: str, *args) -> Callable[[], Any]:
        """Send `method(*args)` to the next live replica now; returns the function that waits for the answer. A
        replica lost on the way is dropped and the request sent again, to the next one."""
        ray = _ray()
        if not self.replicas:
            raise TeacherUnavailable(
                f"Every replica of teacher {self.settings.name!r} at {self.address!r} is lost; restart them (or the "
                "cluster) and resume with --ckpt_path last."
            )
        name, handle = self.replicas[self._next % len(self.replicas)]
        self._next += 1
        sent = getattr(handle, method).remote(*args)

        def answer():
            try:
                return ray.get(sent, timeout=self.settings.timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                if (name, handle) in self.replicas:  # another request may have found it lost first
                    self.replicas.remove((name, handle))
                log.warning(
                    "Teacher replica %s at %s is lost (%s); %d left, retrying there.",
                    name, self.address, type(err).__name__, len(self.replicas),
                )  # fmt: skip
                return self._request(method, *args)()

        return answer
