"""Runtime: how the jobs run, not what they compute.

- :mod:`~dsl.runtime.ray_start`: start a local Ray bound to 127.0.0.1 or join a cluster.
- :mod:`~dsl.runtime.trainer`: the Ray TorchTrainer factory, worker set-up, driver paths.
- :mod:`~dsl.runtime.engine`: the DeepSpeed engine builder (config, optimizer, LR schedule,
  precision, safe checkpoint loading) that pretraining and fine-tuning share.
- :mod:`~dsl.runtime.lr_schedule`: warmup + cosine, stepped per optimizer step.
- :mod:`~dsl.runtime.checkpoint`: pickle-free DeepSpeed checkpoint loading and the job state.
- :mod:`~dsl.runtime.tracking`: MLflow experiments, params and metrics.

Collectives live one layer lower, in :mod:`dsl.collectives`, so the losses can use them too.
"""
