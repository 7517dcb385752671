"""Metric and status names: defined once, imported by the engine, the trainable, W&B and analysis."""

EPOCH = "epoch"
TRAIN_LOSS = "train_loss"
TRAIN_ACC = "train_acc"
VAL_LOSS = "val_loss"
VAL_ACC = "val_acc"
VAL_CLASS_ACC = "val_class_acc"  # dict class name -> accuracy; Tune flattens it to val_class_acc/<name>
LR = "lr"
EPOCH_SECONDS = "epoch_seconds"
IMAGES_PER_SECOND = "images_per_second"  # training images per second of the training phase
PEAK_MEMORY_MB = "peak_memory_mb"  # peak device memory (cuda/mps) or peak process RSS (cpu), MiB
SETUP_SECONDS = "setup_seconds"  # from trial start (or fit entry) to its first training step
STATUS = "status"
MEMBERS = "members"  # a pack's report: member id -> that member's epoch report (cifar_ray.trainable.run_pack)
WARNINGS = "warnings"  # a trial's warnings since its previous report ("; "-joined), printed by the driver

# Scalar metrics reported every epoch; a sweep's `metric` must be one of these.
EPOCH_METRICS = (TRAIN_LOSS, TRAIN_ACC, VAL_LOSS, VAL_ACC, LR, EPOCH_SECONDS, IMAGES_PER_SECOND, PEAK_MEMORY_MB,
                 SETUP_SECONDS)
# ... of which these measure the run, not the model: an epoch trained again (a resume, a retry) reports
# other values for them even where the model's numbers are identical
RUN_MEASUREMENTS = (EPOCH_SECONDS, IMAGES_PER_SECOND, PEAK_MEMORY_MB, SETUP_SECONDS)

# Trial outcomes of the engine.
RUNNING = "running"
COMPLETED = "completed"
DIVERGED = "diverged"
EARLY_STOPPED = "early_stopped"
# ... and of the sweep, as the user reads them.
STOPPED = "stopped"  # stopped early by the scheduler (ASHA)
ERRORED = "errored"  # failed after its retries
UNFINISHED = "unfinished"  # pending, running or paused: a running or interrupted sweep
