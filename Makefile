# Release jobs call these targets. Each installs the project virtualenv first when it is missing or stale,
# so every target works alone on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  ?= shufflenet_v2_x1_0
DATA   ?=
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: install quantize test test-all clean calib-set zoo-table release bench bench-calib bench-eval bench-accuracy \
	bench-runtimes bench-zoo bench-islands bench-ablations bench-stability bench-cost readme-figures

# Optional extras installed beside dev, comma-separated: EXTRAS=openvino (OpenVINO for eval.runtime and make bench).
EXTRAS ?=
comma  := ,
empty  :=
space  := $(empty) $(empty)
# The stamp of a virtualenv holding the dev extra plus the extras in $(1): $(VENV)/.installed+dev+openvino. Each set
# of extras has its own stamp, so asking for one more extra installs it even when the virtualenv is up to date.
venv_with = $(VENV)/.installed$(subst $(space),,$(foreach e,$(sort dev $(subst $(comma),$(space),$(1))),+$(e)))

$(VENV)/.installed+%: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[$(subst +,$(comma),$*)]'
	touch $@

## install [EXTRAS=openvino]: the project virtualenv with the dev tools and the chosen extras
install: $(call venv_with,$(EXTRAS))

## quantize MODEL=<zoo entry> DATA=<imagenet val dir> [ARGS='key=value ...']: export, calibrate, quantize, evaluate, report
quantize: install
	$(PY) -m quantize +model=$(MODEL) $(if $(DATA),data.root=$(DATA)) $(ARGS)

## test: the test suite CI runs (slow end-to-end runs excluded; `make test-all` includes them). Installs the openvino
## extra as well, so CI runs the OpenVINO tests; without OpenVINO (a plain `pip install -e '.[dev]'`) they skip.
TEST_EXTRAS ?= openvino
test: $(call venv_with,$(EXTRAS) $(TEST_EXTRAS))
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: $(call venv_with,$(EXTRAS) $(TEST_EXTRAS))
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf artifacts outputs multirun release .pytest_cache

## calib-set [N=1000] [SEED=0] [GROUND_TRUTH=val_synsets.txt or val_label.txt]: write calib_lists/ilsvrc2012_val_<N>[_seed<S>].txt
N ?= 1000
SEED ?= 0
GROUND_TRUTH ?= ../shared/data/imagenet/val_synsets.txt
calib-set: install
	$(PY) -m data_prep calib-set --ground-truth $(GROUND_TRUTH) --n $(N) --seed $(SEED)

## zoo-table: params and compute of every zoo entry next to the published table (exit 1 when a row is off)
zoo-table: install
	$(PY) -m quantize.models.zoo

## release [MODELS=a,b] DATA=<imagenet val> [ARGS='key=value ...']: release/<model>/ and release/SUMMARY.md
MODELS ?=
release: install
	$(PY) -m quantize.jobs.release $(if $(MODELS),--models $(MODELS)) $(if $(DATA),data.root=$(DATA)) $(ARGS)

## bench [MODEL=<zoo entry>] [DATA=<imagenet val>] [BATCH=32] [ITERATIONS=50] [THREADS=0] [RUNS=1] [RUNTIME=onnxruntime]:
## fp32 vs int8 latency at batch 1 (p50/p90/p99) and throughput at BATCH, timed in alternating blocks with one
## session alive at a time. RUNTIME=openvino times both models in OpenVINO, RUNTIME=onnxruntime,openvino in both, in
## one process, as ratios to ONNX Runtime's fp32 (installs the openvino extra when named).
## JSON in benchmarks/results/<model>/bench.json (bench_<runtimes>.json for other runtimes).
## With DATA the pipeline runs first (cached stages are reused); without, the newest run in outputs/<model>/ is used
## (RUN=outputs/<model>/<time> times that run's models instead).
## RUNS=5: five whole measurements, the median run kept with every run's speedups (the machine drifts between runs).
BATCH      ?= 32
ITERATIONS ?= 50
THREADS    ?= 0
RUNTIME    ?= onnxruntime
RUNS       ?= 1
BENCH_DIR  ?= benchmarks/results
BENCH_OUT  ?= $(BENCH_DIR)/$(MODEL)/bench$(if $(filter-out onnxruntime,$(RUNTIME)),_$(subst $(comma),_,$(RUNTIME))).json
bench: $(call venv_with,$(EXTRAS) $(filter openvino,$(subst $(comma),$(space),$(RUNTIME))))
	$(if $(DATA),$(PY) -m quantize +model=$(MODEL) data.root=$(DATA) $(ARGS) &&) \
	$(PY) -m quantize.bench.latency --model $(MODEL) --batch $(BATCH) --iterations $(ITERATIONS) --threads $(THREADS) \
		--runs $(RUNS) --runtimes $(RUNTIME) --with-rewritten-fp32 $(if $(RUN),--run $(RUN)) --out $(BENCH_OUT)

## bench-calib MODEL=<zoo entry> DATA=<image folder> [SIZES=250,500,1000] [RSS_CAP_GB=12]: peak RSS and time of this
## project's calibration (minmax, percentile) against ONNX Runtime's stock quantize_static (percentile), each run in
## a child process killed above the RSS cap; JSON in benchmarks/results/<model>/bench_calib.json. Exports first.
SIZES      ?= 250,500,1000
RSS_CAP_GB ?= 12
bench-calib: install
	$(PY) -m quantize +model=$(MODEL) data.root=$(DATA) stages=[export] $(ARGS)
	$(PY) -m quantize.bench.calibration --model $(MODEL) --root $(DATA) --sizes $(SIZES) --rss-cap-gb $(RSS_CAP_GB) \
		--threads $(THREADS) --out $(BENCH_DIR)/$(MODEL)/bench_calib.json

## bench-eval MODEL=<zoo entry> DATA=<image folder> [REPEAT=5]: images/s and the 50,000-image estimate of fp32 + int8
## evaluation from JPEG and from a crop cache, and of int8 alone with the fp32 predictions reused; JSON in
## benchmarks/results/<model>/bench_eval.json. Runs the pipeline first (cached stages are reused).
REPEAT ?= 5
bench-eval: install
	$(PY) -m quantize +model=$(MODEL) data.root=$(DATA) $(ARGS)
	$(PY) -m quantize.bench.evaluation --model $(MODEL) --root $(DATA) --repeat $(REPEAT) --batch $(BATCH) \
		--threads $(THREADS) --out $(BENCH_DIR)/$(MODEL)/bench_eval.json

## bench-accuracy MODEL=<zoo entry> DATA=<image folder> [FOLDS=2] [VIEWS=12] [DECOMPOSE=halves|groups|quantizers]
## [ACT_BITS=<widths>] [ARGS=...]: int8 fidelity cross-validated (calibrate on the other folds, measure on the held-out
## one): fp32/int8 top-1 and drop on the photos, agreement on VIEWS views of each (mirror, crops), standard errors
## beside each; DECOMPOSE=halves also measures the int8 model with only its weights and with only its activations
## quantized, groups also each group of activation quantizers alone (one more evaluation per group), quantizers also the
## activations-only model with each quantizer left out in turn (one per quantizer: 42 on ShuffleNetV2, a quarter
## of an hour); ACT_BITS=9,10,12 also the int8 model with every activation quantizer emulated at that many bits
## on its range, with the int8 and with the fp32 weights (two evaluations per width); JSON and table in
## benchmarks/results/<model>/accuracy[-<TAG>].json
FOLDS     ?= 2
VIEWS     ?= 12
TAG       ?=
DECOMPOSE ?=
ACT_BITS  ?=
bench-accuracy: install
	$(PY) -m quantize.bench.accuracy --model $(MODEL) --root $(DATA) --folds $(FOLDS) --views $(VIEWS) \
		--threads $(THREADS) $(if $(DECOMPOSE),--decompose $(DECOMPOSE)) \
		$(if $(ACT_BITS),--activation-bits $(ACT_BITS)) --out $(BENCH_DIR)/$(MODEL)/accuracy$(if $(TAG),-$(TAG)).json \
		$(ARGS)

## bench-stability MODEL=<zoo entry> DATA=<image folder> [VIEWS=12] [ARGS=...]: how often the fp32 model's own top-1
## changes under invisible input changes (pixel noise of 0.25-1 level, a one-pixel shift) on bench-accuracy's views,
## the floor its int8 agreement reads against; JSON and table in benchmarks/results/<model>/stability.json
bench-stability: install
	$(PY) -m quantize.bench.stability --model $(MODEL) --root $(DATA) --views $(VIEWS) --threads $(THREADS) \
		--out $(BENCH_DIR)/$(MODEL)/stability.json $(ARGS)

## bench-ablations MODEL=<zoo entry> DATA=<image folder> [VARIANTS='plain no-balance ...'] [ARGS=...]: bench-accuracy
## once per variant of the default recipe (quantize/bench/accuracy.py VARIANTS: each part off in turn, the plain and
## GPTQ presets): benchmarks/results/<model>/accuracy-<variant>.json, the README's ablation table.
VARIANTS ?= plain gptq-only no-balance percentile no-shared-concat no-weight-scales no-gptq bias-correction int8-stem
bench-ablations: install
	for v in $(VARIANTS); do \
		$(PY) -m quantize.bench.accuracy --model $(MODEL) --root $(DATA) --folds $(FOLDS) --views $(VIEWS) \
			--threads $(THREADS) --variant $$v --out $(BENCH_DIR)/$(MODEL)/accuracy-$$v.json $(ARGS) || exit 1; \
	done

## bench-cost MODEL=<zoo entry> DATA=<photos in synset folders> [IMAGES=1000] [ARGS=...]: the default recipe's time and
## peak RSS against the plain recipe's through the real pipeline, the photos repeated to IMAGES calibration images;
## benchmarks/results/<model>/cost.json (quantize/bench/cost.py).
IMAGES ?= 1000
bench-cost: install
	$(PY) -m quantize.bench.cost --model $(MODEL) --root $(DATA) --images $(IMAGES) --threads $(if $(filter 0,$(THREADS)),1,$(THREADS)) \
		--out $(BENCH_DIR)/$(MODEL)/cost.json $(ARGS)

## readme-figures: rewrite the README's figure blocks from the artifacts in benchmarks/results
## (python -m quantize.bench.summary; the tests fail while a block differs from its artifacts).
readme-figures: install
	$(PY) -m quantize.bench.summary --results $(BENCH_DIR) --readme README.md

## bench-runtimes MODEL=<zoo entry> DATA=<labelled images> [RUNTIMES=onnxruntime,openvino]: fp32 and int8 accuracy
## in each runtime on the same images (top-1/top-5/agreement, agreement on 12 views per image, the paired difference
## and its standard error, agreement with the literal QDQ computation); JSON in
## benchmarks/results/<model>/runtimes.json. Runs the pipeline first (cached stages are reused).
RUNTIMES ?= onnxruntime,openvino
bench-runtimes: $(call venv_with,$(EXTRAS) $(filter openvino,$(subst $(comma),$(space),$(RUNTIMES))))
	$(PY) -m quantize +model=$(MODEL) data.root=$(DATA) $(ARGS)
	$(PY) -m quantize.bench.runtimes --model $(MODEL) --root $(DATA) --runtimes $(RUNTIMES) --threads $(THREADS) \
		--out $(BENCH_DIR)/$(MODEL)/runtimes.json

## bench-zoo [MODELS=a,b] [CALIB=<image folder>] [CALIB_IMAGES=50] [ZOO_ITERATIONS=100] [ZOO_BATCH_ITERATIONS=10] [RUNS=1]
## [ZOO_ARGS=--before]: every zoo entry (random init) exported, calibrated on CALIB_IMAGES images, quantized, and timed
## fp32 vs int8 at batch 1 and BATCH on 2 threads in alternating blocks, with ONNX Runtime's per-operator profile;
## benchmarks/results/zoo/zoo.json and zoo.md. About 1-2 minutes per entry on the 2-core machine.
CALIB                ?= ../shared/data/imagenet/sample
CALIB_IMAGES         ?= 50
ZOO_ITERATIONS       ?= 100
ZOO_BATCH_ITERATIONS ?= 10
ZOO_ARGS             ?=
bench-zoo: install
	$(PY) -m quantize.bench.zoo $(if $(MODELS),--models $(MODELS)) --calib-root $(CALIB) --calib-images $(CALIB_IMAGES) \
		--iterations $(ZOO_ITERATIONS) --batch $(BATCH) --batch-iterations $(ZOO_BATCH_ITERATIONS) --threads 2 --runs $(RUNS) \
		--out $(BENCH_DIR)/zoo $(ZOO_ARGS)

## bench-islands [MODELS=a,b] [ISLANDS=stem,stem_pool,stem_block,swish,global_pool] [CALIB=...] [ISLAND_RUNS=3]:
## the entries short of issue #17's speed goal (or MODELS) built as bench-zoo builds them, then quantized again with
## each candidate fp32 island (nodes_to_exclude) and timed against fp32 and plain int8 at batch 1 and BATCH on 2
## threads; benchmarks/results/zoo_islands/islands.json and islands.md, merged entry by entry. 1-2 minutes per entry.
ISLANDS     ?=
ISLAND_RUNS ?= 3
bench-islands: install
	$(PY) -m quantize.bench.islands $(if $(MODELS),--models $(MODELS)) $(if $(ISLANDS),--islands $(ISLANDS)) \
		--calib-root $(CALIB) --calib-images $(CALIB_IMAGES) --iterations $(ZOO_ITERATIONS) --batch $(BATCH) \
		--batch-iterations $(ZOO_BATCH_ITERATIONS) --threads 2 --runs $(ISLAND_RUNS) \
		--out $(BENCH_DIR)/zoo_islands
