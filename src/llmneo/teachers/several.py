"""Several teachers behind one signal: mixed in probability (`MixtureTeacher`, teacher_weights) or each row
scored by one of them (`RoutedTeacher`, teacher_column; `route_index` reads a row's teacher_column value).
Both keep each teacher's (KD sum, positions) for the metrics (`take_sums`) and close their members; a routed
teacher also hands `prefetch` to its members (served teachers; the config refuses teacher_weights with them)."""

from __future__ import annotations

import torch

from llmneo.loss.rows import MixtureRows
from llmneo.teachers.signal import Group, TeacherSignal, sub_batch


class _SeveralTeachers(TeacherSignal):
    """Teachers in config order, and each one's (KD sum, positions) since the metrics last took them."""

    def __init__(self, teachers: list[TeacherSignal], device):
        self.teachers = teachers
        self.sums = torch.zeros(len(teachers), 2, dtype=torch.float64, device=device)
        self.prefetches = any(t.prefetches for t in teachers)  # served members: read steps ahead for them

    def take_sums(self) -> torch.Tensor:
        sums, self.sums = self.sums, torch.zeros_like(self.sums)
        return sums

    def close(self) -> None:
        for t in self.teachers:
            t.close()


class MixtureTeacher(_SeveralTeachers):
    """Several teachers mixed in probability (teacher_weights): their rows become MixtureRows, which add
    the student's divergence from each teacher alone to `sums`."""

    def __init__(self, teachers: list[TeacherSignal], weights: list[float], device):
        super().__init__(teachers, device)
        self.log_weights = torch.tensor(weights, dtype=torch.float32).log()

    def rows(self, batch: dict, positions: torch.Tensor) -> MixtureRows:
        return MixtureRows([t.rows(batch, positions) for t in self.teachers], self.log_weights, self.sums)


class RoutedTeacher(_SeveralTeachers):
    """Several teachers, each row scored by one (teacher_column): `groups` splits each micro-batch by
    `batch["teacher"]` and the loop runs the loss once per teacher, so each KD sum is that teacher's exactly."""

    def groups(self, batch: dict) -> list[Group]:
        """One group for every teacher with rows in `batch`: its rows (bool [B]) and its place in `teachers`."""
        route = batch["teacher"]
        return [Group(self.teachers[i], route == i, i) for i in range(len(self.teachers)) if bool((route == i).any())]

    def rows(self, batch: dict, positions: torch.Tensor):
        raise NotImplementedError("a routed teacher scores rows by group: the loop asks each group's signal")

    def add(self, group: Group, kd_sum: torch.Tensor, positions: int) -> None:
        self.sums[group.index, 0] += kd_sum.detach().double()
        self.sums[group.index, 1] += positions

    def prefetch(self, batch: dict, positions: torch.Tensor) -> None:
        for group in self.groups(batch):  # each member is asked for its own rows, as the loop will ask
            group.signal.prefetch(sub_batch(batch, group.rows), positions[group.rows])


def route_index(value, entries: list[str]) -> int | None:
    """A teacher_column value as a teacher's index: an int (or its text) in range, an entry, or an entry's last
    part (a model folder's name, a URL's host:port/path end); None when nothing matches."""
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        return index if 0 <= index < len(entries) else None
    for i, entry in enumerate(entries):
        if text in (entry, entry.rstrip("/").rsplit("/", 1)[-1]):
            return i
    return None
