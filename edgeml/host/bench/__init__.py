"""Host-side benchmarks behind ``edgeml bench`` and ``benchmarks/`` (needs the host extra).

- :mod:`edgeml.host.bench.models`: one bundle at several batch sizes under an emulated firmware
  profile (``run_models_bench``).
- :mod:`edgeml.host.bench.e2e`: the whole MQTT path, edgeml side by side with raw onnxruntime, a raw
  paho subscriber and the plain paho + ``session.run`` script (``E2ESettings``, ``run_e2e``).
- :mod:`edgeml.host.bench.baselines`: the processes those comparisons run (publisher, counter,
  plain script, bare sessions).
- :mod:`edgeml.host.bench.report`: terminal table, JSON, markdown and PNG charts.

Nothing is imported here, so ``import edgeml.host.bench`` stays free of numpy and onnxruntime.
"""
