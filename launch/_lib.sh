# Helpers shared by the launch scripts (sourced; each script defines its own die_usage).
# shellcheck shell=bash

# Prints a command as one shell-quoted line (copy-pasteable).
quote() {
  local out="" word
  for word in "$@"; do
    if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+="$word "
    elif [[ "$word" != *[\$\`\"\\!]* ]]; then
      out+="\"$word\" "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  printf '%s' "${out% }"
}

# check_int OPTION VALUE MIN [MAX]: a usage error unless VALUE is an integer in range.
check_int() {
  if ! [[ "$2" =~ ^[0-9]+$ ]] || ((10#$2 < $3)) || { [[ $# -gt 3 ]] && ((10#$2 > $4)); }; then
    die_usage "$1 must be an integer >= $3${4:+ and <= $4}, got '$2'"
  fi
}

need_value() { [[ $# -ge 2 && -n "$2" ]] || die_usage "option $1 needs a value"; }
