# Sourced by gpu_all.sh and gpu_one_card.sh: a job that outlives the shell that starts it, and the ways to follow it.
# The sourcing script sets S (the job's folder) and LOGS (its log names), defines job_run (the work) and job_collect
# (what goes to $OUT), then calls `job_main "$0" "$@"`:
#   SCRIPT start            job_run in the background; SCRIPT wait SECONDS  follow it, then collect into $OUT if set

# job_start SCRIPT: a fresh $S, then `SCRIPT run` in the background (setsid), its output in $S/driver.log.
job_start() {
  rm -rf "$S"; mkdir -p "$S/results"
  setsid nohup bash "$1" run > "$S/driver.log" 2>&1 < /dev/null &
  echo "started: $S (pid $!)"
}

# job_note TEXT: a timestamped line in $S/progress.log.
job_note() { echo "[$(date +%T)] $*" >> "$S/progress.log"; }

# job_wait SECONDS LOG...: until the job is done or SECONDS pass, then its progress and the end of each LOG
# ($S/LOG.log) that exists.
job_wait() {
  local limit=$1 start f
  shift
  start=$(date +%s)
  while [ ! -e "$S/done" ] && [ $(( $(date +%s) - start )) -lt "$limit" ]; do sleep 5; done
  echo "== progress"; cat "$S/progress.log" 2>/dev/null
  for f in "$@"; do
    [ -f "$S/$f.log" ] && { echo "== $f.log (end)"; tail -n 20 "$S/$f.log"; }
  done
}

# job_status: ALL DONE or STILL RUNNING, last.
job_status() { [ -e "$S/done" ] && echo "ALL DONE" || echo "STILL RUNNING"; }

job_main() {
  local script=$1 cmd=${2:?usage: $1 start|run|wait SECONDS}
  case "$cmd" in
    start) job_start "$script" ;;
    run) job_run; touch "$S/done" ;;
    wait)
      job_wait "${3:-570}" "${LOGS[@]}"
      if [ -n "${OUT:-}" ]; then job_collect; ls -la "$OUT"; fi
      job_status ;;
    *) echo "usage: $script start|run|wait SECONDS" >&2; return 2 ;;
  esac
}
