"""Stand-ins for the paper profile's rehearsal on CPU: small local datasets and task YAMLs for the
paper's lmms-eval tasks (``zoo_prune.rehearsal.tasks``) and tiny random-weight checkpoints of the
paper's model classes (``zoo_prune.rehearsal.checkpoints``)."""
