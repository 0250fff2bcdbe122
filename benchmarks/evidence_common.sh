# Sourced by the site_*_evidence.sh scripts: what their runs share.
# share_run SRC DEST PART...: a new run folder DEST that reuses SRC's PARTs (files or stage folders), its baseline rows
# and its ceiling measurement, so that the experiment in DEST trains and measures only what differs.
share_run() {
    local src=$1 dest=$2
    shift 2
    mkdir -p "$dest/rows" "$dest/judged"
    for p in "$@"; do cp -a "$src/$p" "$dest/"; done
    cp -a "$src/rows/baseline" "$dest/rows/"
    if [ -f "$src/judged/ceiling.json" ]; then cp -a "$src/judged/ceiling.json" "$dest/judged/"; fi
}
