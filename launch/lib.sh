# Shared by the launch scripts (sourced, not run): errors, quoting and dry-run.
# The caller sets SCRIPT_NAME (for messages) and DRY_RUN (1: print commands only).

die() {
  echo "$SCRIPT_NAME: error: $*" >&2
  echo "Run $SCRIPT_NAME --help for the options." >&2
  exit 2
}

# Shell-quotes one word so that a printed command line can be pasted back verbatim
# (`--flag='value with spaces'` keeps the flag name readable).
quote() {
  local sq="'" escaped_sq="'\\''" safe='^[A-Za-z0-9_@%+=:,./-]+$'
  if [[ $1 =~ $safe ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//$sq/$escaped_sq}"
  else
    printf "'%s'" "${1//$sq/$escaped_sq}"
  fi
}

quote_all() {
  local words=() word
  for word in "$@"; do words+=("$(quote "$word")"); done
  printf '%s' "${words[*]}"
}

# Runs a command, or only prints it in dry-run mode.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

# Splits an option word into KEY and VALUE: `--key=value`, or `--key value` (then SHIFT=1:
# the caller drops the next word too). A word that is not an option leaves KEY empty.
read_option() {
  KEY="" VALUE="" SHIFT=0
  if [[ $1 == --*=* ]]; then
    KEY=${1%%=*} VALUE=${1#*=}
  elif [[ $1 == --* ]]; then
    KEY=$1
    (($# > 1)) || die "$KEY needs a value"
    VALUE=$2 SHIFT=1
  fi
}

# Reads the command line into COMMAND (the one word that is not an option), EXTRA (all
# after `--`, passed on to the training job) and the caller's settings: each option goes to
# the caller's `set_option KEY VALUE`, each valueless switch to `set_switch WORD` (which
# returns non-zero for a word that is not one of its switches).
set_switch() { return 1; }

parse_arguments() {
  COMMAND="" EXTRA=()
  local arg
  while (($#)); do
    arg=$1
    shift
    case $arg in
      -h|--help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; continue ;;
      --) EXTRA=("$@"); break ;;
    esac
    set_switch "$arg" && continue
    read_option "$arg" "$@"
    if [[ -z $KEY ]]; then
      [[ -z $COMMAND ]] || die "unexpected argument '$arg' (config overrides go after --)"
      COMMAND=$arg
      continue
    fi
    shift "$SHIFT"
    set_option "$KEY" "$VALUE"
  done
}
