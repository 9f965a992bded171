"""Runtime: how the jobs run, not what they compute.

- :mod:`~dsl.runtime.ray_start`: start a local Ray bound to 127.0.0.1 or join a cluster.
- :mod:`~dsl.runtime.trainer`: the Ray TorchTrainer factory, worker set-up, driver paths.
- :mod:`~dsl.runtime.engine`: the DeepSpeed engine builder (config, optimizer, LR schedule,
  precision, safe checkpoint loading) that pretraining and fine-tuning share.
- :mod:`~dsl.runtime.lr_schedule`: warmup + cosine, stepped per optimizer step.
- :mod:`~dsl.runtime.checkpoint`: pickle-free DeepSpeed checkpoint loading, the job state and
  resuming on the same or another number of workers.
- :mod:`~dsl.runtime.full_state`: the world-size-free state (fp32 master, AdamW moments by name).
- :mod:`~dsl.runtime.device`: GPU set-up (channels_last, cuDNN, compile) and the batch prefetcher.
- :mod:`~dsl.runtime.tracking`: MLflow experiments, params and best-effort metrics.

Collectives live one layer lower, in :mod:`dsl.collectives`, so the losses can use them too.
"""
