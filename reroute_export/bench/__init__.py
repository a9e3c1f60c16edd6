"""`reroute-export bench`: measured prefill / decode speed next to the planner's figures.

For every (method, backend, precision) on the same inputs in one run: vision ms, prefill ms (p50,
p90), decode ms/token, peak memory, and the analytic figures of `plan.plan_report`
(prefill TFLOPs with and without the vision tower, KV-cache bytes, the theoretical
token-layer speedup vs `none`). A summary holds the three ratios the project tracks:

    reroute prefill speedup vs none, same backend, against the theoretical one
    reroute prefill / pdrop prefill (the cost of recoverability over physical delete)
    torch reroute prefill / onnxruntime reroute prefill (what the export buys)

Backends (runtime.BACKENDS, each a runtime.base.Runtime):
    torch         the eager reference, runtime.eager.EagerRuntime (routing.RoutedModel)
    torch-static  the export's static-shape modules, runtime.torch_static (CUDA graphs on a GPU)
    onnxruntime   the artifact `pipeline.export_artifact` writes, run by
                  `runtime.OrtArtifact` on CPU (the vision graph, then the segment, head
                  and routing graphs over fixed per-layer KV buffers: runtime/segmented.py)
    tensorrt      where TensorRT and a GPU are present: the same artifact exported with
                  --target trt, its engines run by `runtime.trt.TrtArtifact` (KV caches
                  stay on the GPU); elsewhere every record says "skipped: ..." (never faked)

Method: each backend first runs one untimed memory pass per method, then warm-up and
timed rounds; within a round every method makes one vision + prefill + decode pass,
the first method rotating per round, so drift on a shared machine hits all methods
alike. Backends run one after the other, never concurrently. Prefill times the decoder
alone (embeddings with the image features are built once per method, at `bind`, outside
the timer); vision is timed on its own. `prefill_cpu_ms_p50` is process CPU time (all
threads): with --threads 1 it barely moves when other processes share the cores. The
memory pass's greedy tokens and decisions are judged against the eager backend's with
check.loop.judge (the comparison parity and the post-export check use).

Peak memory (`peak_mem_mb`) is RSS, not tracemalloc (torch and ONNX Runtime allocate
outside Python's allocator): the peak RSS growth during the memory pass over the RSS
just before it, after glibc's malloc_trim and with VmHWM reset via /proc/self/clear_refs.
It counts activations, KV caches and runtime arenas; weights are `weights_rss_mb`
(ONNX Runtime sessions; the torch model is shared by every torch record). `peak_rss_mb`
is the process's own peak RSS (VmHWM) in that pass: everything the bench process holds.

KV-cache traffic per decode step (`kv_traffic_per_decode_step`, per record and per method
in the summary; traffic.py): the bytes the fixed buffers move (one new row written per
layer, the M_s-row buffers read by attention) against the concat layout they replaced (a
copy of the whole cache per layer per step), from the plan and the prompt length.

Precisions (--precisions fp32,fp16,int8,int4; the onnxruntime backend): one record per
(method, precision). fp16 is `export --precision fp16`; int8/int4 are weight-only artifacts
`quantize` makes from the fp32 one (config.QUANTIZE: rtn, block 128, MatMulNBits). Each
record holds `weight_bytes` (every graph) and `decoder_weight_bytes` (segment and head
graphs: what a decode step reads), read from the graph headers; the other precisions'
memory passes are judged against fp32's (`agreement.reference` "onnxruntime fp32": routing
overlap per stage, greedy tokens), and the summary's `per_precision` holds the ratios to
fp32 and fp16. Floors (floors.py), measured once per run before any backend: the machine's
copy bandwidth and a plain GEMM's FLOP rate; every record gets `decode_floor_ms` (decoder
weight bytes + the KV rows attention reads, at copy speed), `prefill_floor_ms` (the plan's
prefill FLOPs at the GEMM rate) and how far above each it ran.

config.py   what a run is asked for (BenchConfig), checked against the library's names
floors.py   copy bandwidth and GEMM rate of this machine; weight bytes per record
memory.py   RSS and torch.cuda peak memory of one pass
traffic.py  KV-cache bytes moved per decode step, fixed buffers vs the concat layout
timing.py   Samples, percentiles, one timed pass over a runtime.base.Run
machine.py  the machine a run was measured on
run.py      run_bench: inputs, plans, exports, the runs per backend, records
report.py   summarize (tracked ratios, agreement), summary lines, Markdown
cli.py      the `bench` subcommand
"""
