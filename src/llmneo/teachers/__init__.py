"""Where the teacher signal comes from, behind one interface (`signal.TeacherSignal`): `choose` picks it once
from the config; live, cached, served, several (mixture, routing); `aligner` maps teacher rows onto student
positions when the tokenizers differ."""
