"""The two RADLADS stages as nn.Modules (forward(input_ids) -> (loss, metrics)), so DDP wraps the whole loss."""
from __future__ import annotations

import functools

import torch
from torch import nn

from hybrid_distill.distill.fused_kl import chunked_kl_from_hidden
from hybrid_distill.distill.maskless_attention import maskless_causal_attention
from hybrid_distill.distill.precision import to_device
from hybrid_distill.distill.recompute import recompute_decoder_layers
from hybrid_distill.distill.teacher_ahead import TeacherAhead
from hybrid_distill.distill.teacher_stream import TeacherStream
from hybrid_distill.models.student import decoder_layers, mixers_of


def capture_attention_io(model: nn.Module, layers, input_ids: torch.Tensor) -> dict[int, tuple]:
    """Run `model` once and return {layer: (normed attention input, attention output)} for the given layers."""
    captured, handles = {}, []
    for i in layers:
        def hook(module, args, kwargs, output, i=i):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            captured[i] = (hidden.detach(), output[0].detach())
        handles.append(decoder_layers(model)[i].self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        model.model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


class HiddenAlignment(nn.Module):
    """Stage 1 (eq. 4): per linear layer, ||Mix_T(LN(X)) - Mix_S(LN(X))||^2 averaged over tokens, summed.

    Teacher forcing, as RADLADS stage 1 does: every student mixer reads the teacher's own layer input, so each
    layer's loss depends on that layer's mixer alone. Only mixer parameters train (FFN, norms, embeddings and
    softmax layers are frozen); with per-layer clipping the stage decomposes exactly layer by layer.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.student.requires_grad_(False)
        self.linear_layers = sorted(mixers_of(student))
        for i in self.linear_layers:
            decoder_layers(student)[i].self_attn.requires_grad_(True)
        self.teacher.requires_grad_(False).eval()

    def clip_groups(self) -> list[list[str]]:
        """One clip group per layer keeps the layers' updates independent."""
        groups = {i: [] for i in self.linear_layers}
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                groups[int(name.split(".")[3])].append(name)  # student.model.layers.{i}.self_attn...
        return [names for names in groups.values() if names]

    def layer_losses(self, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        with torch.no_grad(), maskless_causal_attention(self.teacher):
            targets = capture_attention_io(self.teacher, self.linear_layers, input_ids)
        losses = {}
        for i in self.linear_layers:
            normed_input, teacher_output = targets[i]
            student_output = decoder_layers(self.student)[i].self_attn(normed_input)[0]
            losses[i] = (student_output.float() - teacher_output.float()).pow(2).sum(-1).mean()
        return losses

    def forward(self, input_ids: torch.Tensor):
        losses = self.layer_losses(input_ids)
        total = torch.stack(list(losses.values())).sum()
        # Metrics stay on the device: the trainer converts them when it logs, not at every step.
        return total, {f"mse_layer{i}": loss.detach() for i, loss in losses.items()}


def teacher_final_hidden(teacher: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The frozen teacher's final hidden states on unpadded rows from position 0 (the KL's teacher side)."""
    with torch.no_grad(), maskless_causal_attention(teacher):
        return teacher.model(input_ids=input_ids, use_cache=False).last_hidden_state


class LogitDistillation(nn.Module):
    """Stage 2 (eq. 5): tau^2/T sum_t KL(softmax(teacher_t/tau) || softmax(student_t/tau)), all student weights.

    The KL is computed in token chunks from final hidden states, so [tokens x vocab] logits never exist. With a
    `teacher_cache` (distill/teacher_cache.py), batches whose rows it holds take the teacher's final hidden
    states from it instead of running the teacher's body; other batches run the live teacher.
    `activation_checkpointing` recomputes each student layer in backward (distill/recompute.py); `compile_kl`
    compiles the KL's per-chunk maths (fused_kl.py); `teacher_stream` runs the live teacher's body on a second CUDA
    stream beside the student's forward (teacher_stream.py); `teacher_ahead` (without a cache) runs it one
    micro-batch ahead instead, beside the student's forward and backward (teacher_ahead.py): the caller then passes
    each micro-step the next micro-batch's ids and calls `finish_step()` after each optimizer step.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float, chunk_tokens: int,
                 trainable: str | None = "all", teacher_cache=None, activation_checkpointing: bool = False,
                 compile_kl: bool = False, teacher_stream: bool = False, teacher_ahead: bool = False):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.temperature, self.chunk_tokens, self.compile_kl = temperature, chunk_tokens, compile_kl
        self.teacher_cache = teacher_cache
        self.teacher_stream = TeacherStream() if teacher_stream else None
        self.teacher_ahead = TeacherAhead(functools.partial(teacher_final_hidden, teacher)) \
            if teacher_ahead and teacher_cache is None else None
        if trainable is not None:  # None: leave the student's flags alone (scoring a model mid-training)
            self.student.requires_grad_(trainable == "all")
        if trainable == "attention":  # every layer's attention or mixer module, nothing else
            for layer in decoder_layers(student):
                layer.self_attn.requires_grad_(True)
        self.teacher.requires_grad_(False).eval()
        if activation_checkpointing:
            recompute_decoder_layers(self.student)

    @property
    def reads_following_ids(self) -> bool:
        """Whether each micro-step wants the next micro-batch's ids (`following_ids`): the teacher runs ahead."""
        return self.teacher_ahead is not None

    def finish_step(self) -> None:
        """After each optimizer step: the step's stream waits for the teacher running ahead (a graph's capture must
        join every stream it forked)."""
        if self.teacher_ahead is not None:
            self.teacher_ahead.join()

    @property
    def reads_sequence_indices(self) -> bool:
        """Whether the trainer looks each batch's data rows up in `cached_inputs`: only with a teacher cache."""
        return self.teacher_cache is not None

    def cached_inputs(self, sequence_indices, device: torch.device) -> dict:
        """{"teacher_hidden": the cached teacher rows on `device`} when the cache holds every row of the batch,
        else {} (the step runs the live teacher). Read on the host before a step, so that a graphed step takes
        the rows as an input it copies in; call it in the step's autocast context, which the cache checks."""
        cache = self.teacher_cache
        if cache is None or not cache.covers(sequence_indices):
            return {}
        return {"teacher_hidden": to_device(cache.rows(sequence_indices, device.type), device)}

    def forward(self, input_ids: torch.Tensor, teacher_hidden=None, following_ids=None):
        """`teacher_hidden` (the cached rows `cached_inputs` read) skips the teacher's body; without it the live
        teacher runs: on `input_ids`, or with `teacher_ahead` on `following_ids` for the next micro-step."""
        cached = teacher_hidden is not None
        ahead = self.teacher_ahead is not None and not cached
        if ahead != (following_ids is not None):
            raise ValueError("following_ids goes with teacher_ahead and a live teacher, and only there")
        beside = self.teacher_stream is not None and not cached and not ahead
        if ahead:
            teacher_hidden = self.teacher_ahead.take(input_ids)
            self.teacher_ahead.start(following_ids)
        elif not cached:
            run_teacher = functools.partial(teacher_final_hidden, self.teacher, input_ids)
            teacher_hidden = self.teacher_stream.start(run_teacher, input_ids.device) if beside else run_teacher()
        with maskless_causal_attention(self.student):  # training rows: unpadded, from position 0
            student_hidden = self.student.model(input_ids=input_ids, use_cache=False).last_hidden_state
        if beside:
            teacher_hidden = self.teacher_stream.join(teacher_hidden)
        loss = chunked_kl_from_hidden(
            student_hidden, self.student.lm_head.weight, teacher_hidden, self.teacher.lm_head.weight,
            temperature=self.temperature, chunk_tokens=self.chunk_tokens,
            student_head_bias=self.student.lm_head.bias, teacher_head_bias=self.teacher.lm_head.bias,
            compiled=self.compile_kl)
        return loss, ({} if self.teacher_cache is None else {"teacher_cached": float(cached)})


HELDOUT_TEACHER_MAX_BYTES = 1 << 30  # kept teacher rows of one job's held-out scores; above this they are recomputed


class HeldoutTeacher:
    """The teacher's final hidden states on the held-out rows, kept from a job's first score for its later ones:
    the teacher does not train, so each later snapshot runs only the student's body (the same values). A batch is
    reused only for the same token ids."""

    def __init__(self, max_bytes: int = HELDOUT_TEACHER_MAX_BYTES):
        self.max_bytes, self.rows, self.kept_bytes, self.teacher_passes = max_bytes, {}, 0, 0

    def hidden(self, teacher: nn.Module, input_ids: torch.Tensor, first: int) -> torch.Tensor:
        kept_ids, kept_hidden = self.rows.get(first, (None, None))
        if kept_ids is not None and kept_ids.shape == input_ids.shape and torch.equal(kept_ids, input_ids):
            return kept_hidden
        hidden = teacher_final_hidden(teacher, input_ids)
        self.teacher_passes += 1
        size = hidden.numel() * hidden.element_size()
        if first not in self.rows and self.kept_bytes + size <= self.max_bytes:
            self.rows[first] = (input_ids, hidden)
            self.kept_bytes += size
        return hidden


@torch.no_grad()
def heldout_kl(student, teacher, data, num_sequences: int, batch_size: int, temperature: float = 1.0,
               chunk_tokens: int = 4096, kept_teacher: HeldoutTeacher | None = None) -> float:
    """Token-mean KL(teacher || student) on the first `num_sequences` held-out sequences (I(l) = -this).

    Leaves the student as it found it (train/eval mode and which parameters train), so training can go on after
    a mid-run score. Pass one `kept_teacher` to every score of a job to run the teacher's body only once.
    """
    objective = LogitDistillation(student, teacher, temperature, chunk_tokens, trainable=None)
    kept_teacher = kept_teacher or HeldoutTeacher(max_bytes=0)
    was_training = student.training
    student.eval()
    total, count = 0.0, 0
    num_sequences = min(num_sequences, data.num_sequences)
    device = next(student.parameters()).device
    for first in range(0, num_sequences, batch_size):
        size = min(batch_size, num_sequences - first)
        input_ids = data.batch(first, size).to(device)
        loss, _ = objective(input_ids, teacher_hidden=kept_teacher.hidden(teacher, input_ids, first))
        total += loss.item() * size
        count += size
    student.train(was_training)
    return total / count


@torch.no_grad()
def heldout_layer_mse(student, teacher, data, num_sequences: int, batch_size: int) -> dict[int, float]:
    """Per linear layer, the stage-1 alignment error on held-out data (the GA-S1 signal)."""
    objective = HiddenAlignment(student, teacher)
    device = next(student.parameters()).device
    sums: dict[int, float] = {}
    num_sequences = min(num_sequences, data.num_sequences)
    for first in range(0, num_sequences, batch_size):
        size = min(batch_size, num_sequences - first)
        for layer, loss in objective.layer_losses(data.batch(first, size).to(device)).items():
            sums[layer] = sums.get(layer, 0.0) + loss.item() * size
    return {layer: total / num_sequences for layer, total in sums.items()}
