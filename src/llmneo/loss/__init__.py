"""The loss, pure torch: `divergences` (CE and the six divergences), `rows` (the teacher-row types, each scoring
its own divergence against a student chunk), `closed_form` (gradients without autograd), `chunked` (the fused
chunked loss over the student's head)."""
