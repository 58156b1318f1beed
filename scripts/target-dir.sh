# Sourced by scripts/test.sh and scripts/run-local.sh (from the repository root): the build
# directory both share, so that running one after the other never rebuilds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/citystream/target}"

# The same directory may serve more than one checkout on a machine (a working copy and a clean
# clone of it). Cargo keeps a workspace crate's sources relative to its package, so a build made
# from another checkout looks fresh here when this checkout's files are older than that build,
# and its tests would keep the other checkout's `env!("CARGO_MANIFEST_DIR")`: its files, which
# may have changed or be gone. When there is a build from elsewhere or from an unknown checkout,
# the workspace's own crates are built again (the dependencies are kept).
mkdir -p "$CARGO_TARGET_DIR"
checkout_file="$CARGO_TARGET_DIR/citystream-checkout"
built_from="$(cat "$checkout_file" 2>/dev/null || echo "an unrecorded checkout")"
if [ -d "$CARGO_TARGET_DIR/debug" ] && [ "$built_from" != "$PWD" ]; then
  echo "the build in $CARGO_TARGET_DIR is from $built_from: building this checkout's crates again" >&2
  cargo clean --locked -p citystream-schemas -p citystream-operators -p citystream-models \
    -p citystream-pipeline -p citystream-tests -p citystream-benches
fi
echo "$PWD" > "$checkout_file"
