#!/usr/bin/env bash
# Webhook durability and latency, in release mode: the integration test that pushes
# BERTH_WEBHOOK_PUSHES (10,000) small images from 4 writers while the receiver flaps and
# berth is killed with SIGKILL three times, then measures delivery latency with a healthy
# receiver, then runs two nodes on PostgreSQL (when its server binaries are installed).
# Prints the tests' figures. Everything runs on 127.0.0.1 and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
export BERTH_WEBHOOK_PUSHES=${BERTH_WEBHOOK_PUSHES:-10000}
cargo test --release --locked -p berth --test it -- --nocapture --test-threads=1 \
  webhooks::every_acknowledged_push_arrives_once_per_policy_through_flapping_and_kills \
  webhooks::two_postgres_nodes_deliver_each_event_once_and_take_over_from_each_other \
  2>&1 | grep -E '^(webhooks |  (policy|healthy|the delivering)|test webhooks|test result)'
