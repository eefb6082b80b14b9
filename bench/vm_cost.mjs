// The filter's own work in V8, without Envoy: `make bench-vm`.
//
//   node bench/vm_cost.mjs [--streamlb F.wasm] [--floor F.wasm] [--baseline F.wasm]
//                          [--rounds 9] [--calls 20000] [--warmup N] [--quick] [--json OUT]
//                          [--only streamlb,floor_streamlb_calls] (e.g. under node --cpu-prof)
//                          [--streamlb-config '{"mode": "shadow"}']
//
// Node.js runs the same .wasm files Envoy loads, on V8 (Envoy's wasm runtime), against a host
// written here in JavaScript: the proxy-wasm ABI calls answer from memory (headers, properties,
// a clock, shared data, metrics; the admin `/clusters` poll and the probes are answered at once).
// Each module drives the same unary gRPC call (request headers, one message each way, trailers,
// end) `--calls` times per round, rounds interleaved (module order rotated), and a timer tick
// every second of its virtual clock (one call per 70 µs, as at saturation in `bench/cost.py`).
//
// The host's work is the same for the same host calls, so
//   streamlb − floor_streamlb_calls (the floor making exactly streamlb's host calls)
// is streamlb's own work in the VM, which Envoy's CPU figures can only resolve to ±6 µs.
// Envoy's side of each host call is not here (bench/cost.py measures it).
//
// VM_COST_TRACE=1 prints the host calls of one call per module (traced after the warm-up);
// VM_COST_LOG_LEVEL=0 keeps the modules' logs from that level (default: warnings and errors,
// which fail the run) and prints them.
//
// Prints a table and, with --json, writes every round. Exits non-zero when a module does not
// behave as expected: streamlb must name a pod in the endpoint header of every call, and
// floor_streamlb_calls make the same host calls as streamlb, in the same order.

import { readFileSync, writeFileSync } from "node:fs";
import { performance } from "node:perf_hooks";

const argv = process.argv.slice(2);
const arg = (name, dflt) => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 ? argv[i + 1] : dflt;
};
const quick = argv.includes("--quick");
const target = arg("target-dir", process.env.CARGO_TARGET_DIR || "target");
const wasmDir = `${target}/wasm32-wasip1/release`;
const ROUNDS = Number(arg("rounds", quick ? 2 : 9));
const CALLS = Number(arg("calls", quick ? 500 : 20000));
const WARMUP = Number(arg("warmup", quick ? 200 : 20000));
const CALL_NS = 70_000n; // virtual time per call
const PODS = ["127.0.0.1:40001", "127.0.0.1:40002"];
const ENDPOINT_HEADER = "x-gateway-destination-endpoint"; // both modules' default

// bench/cost.py's configuration (defaults otherwise: probes on, rebalancing in shadow), plus
// --streamlb-config JSON.
const STREAMLB_CONFIG = { clusters: ["pods"], tick_ms: 1000, ...JSON.parse(arg("streamlb-config", "{}")) };
const FLOOR = arg("floor", `${wasmDir}/streamlb_floor.wasm`);
const modules = [
  { name: "floor", wasm: FLOOR, config: {} },
  { name: "floor_bodies", wasm: FLOOR, config: { read_bodies: true } },
  {
    name: "floor_streamlb_calls",
    wasm: FLOOR,
    config: { streamlb_calls: true, read_bodies: true, endpoints: PODS.join(",") },
  },
  { name: "streamlb", wasm: arg("streamlb", `${wasmDir}/streamlb.wasm`), config: STREAMLB_CONFIG, steers: true },
];
if (arg("baseline")) {
  modules.push({ name: "streamlb_baseline", wasm: arg("baseline"), config: STREAMLB_CONFIG, steers: true });
}

const only = arg("only");
if (only) {
  const keep = new Set(only.split(","));
  modules.splice(0, modules.length, ...modules.filter((m) => keep.has(m.name)));
}

// proxy-wasm enums (ABI 0.2.1).
const OK = 0, NOT_FOUND = 1, CAS_MISMATCH = 8, UNIMPLEMENTED = 12;
const MAP = { REQUEST: 0, RESPONSE: 2, RESPONSE_TRAILERS: 3, HTTP_CALL_RESPONSE: 6 };
const BUFFER = { REQUEST_BODY: 0, RESPONSE_BODY: 1, HTTP_CALL_RESPONSE_BODY: 4, VM_CONFIGURATION: 6, PLUGIN_CONFIGURATION: 7 };
const enc = new TextEncoder();
const dec = new TextDecoder();

function grpcMessage(payload) {
  const out = new Uint8Array(5 + payload);
  new DataView(out.buffer).setUint32(1, payload);
  return out;
}

function adminClusters() {
  const hosts = PODS.map((a) => {
    const [address, port] = a.split(":");
    return {
      address: { socket_address: { address, port_value: Number(port) } },
      health_status: { eds_health_status: "HEALTHY" },
      weight: 1,
      locality: { zone: "a" },
    };
  });
  return JSON.stringify({ cluster_statuses: [{ name: "pods", host_statuses: hosts }] });
}

function serializePairs(pairs) {
  const parts = pairs.map(([k, v]) => [enc.encode(k), enc.encode(v)]);
  let size = 4 + 8 * parts.length;
  for (const [k, v] of parts) size += k.length + v.length + 2;
  const out = new Uint8Array(size);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, parts.length, true);
  let at = 4;
  for (const [k, v] of parts) {
    dv.setUint32(at, k.length, true);
    dv.setUint32(at + 4, v.length, true);
    at += 8;
  }
  for (const [k, v] of parts) {
    out.set(k, at);
    at += k.length + 1;
    out.set(v, at);
    at += v.length + 1;
  }
  return out;
}

function parsePairs(bytes) {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = dv.getUint32(0, true);
  const lens = [];
  for (let i = 0; i < n; i++) lens.push([dv.getUint32(4 + 8 * i, true), dv.getUint32(8 + 8 * i, true)]);
  let at = 4 + 8 * n;
  return lens.map(([kl, vl]) => {
    const k = dec.decode(bytes.subarray(at, at + kl));
    at += kl + 1;
    const v = dec.decode(bytes.subarray(at, at + vl));
    at += vl + 1;
    return [k, v];
  });
}

// Encoded strings, kept: the host's own work stays small next to the VM's.
const encoded = new Map();
function bytesOf(v) {
  let b = encoded.get(v);
  if (!b) {
    b = enc.encode(v);
    encoded.set(v, b);
  }
  return b;
}

// A header map, its serialized form kept until it changes.
class HeaderMap {
  constructor(pairs = []) {
    this.m = new Map(pairs);
    this.bytes = null;
  }
  get size() {
    return this.m.size;
  }
  get(k) {
    return this.m.get(k);
  }
  set(k, v) {
    this.m.set(k, v);
    this.bytes = null;
  }
  delete(k) {
    if (this.m.delete(k)) this.bytes = null;
  }
  // This map becomes a copy of `other` (whose serialized form it shares).
  copy(other) {
    this.m = new Map(other.m);
    this.bytes = other.serialized();
  }
  serialized() {
    if (!this.bytes) this.bytes = serializePairs([...this.m]);
    return this.bytes;
  }
}

// One VM (one module instance) with its own host state.
class Vm {
  constructor(spec) {
    this.spec = spec;
    this.now = 1_700_000_000_000_000_000n;
    this.nextTick = 0n;
    this.tickPeriod = 0n;
    this.maps = new Map(); // map type -> HeaderMap
    this.buffers = new Map();
    this.shared = new Map(); // key -> { value: Uint8Array, cas }
    this.metrics = [];
    this.pendingCalls = []; // [token, upstream, headers]
    this.nextToken = 1;
    this.logs = [];
    this.hostCalls = 0;
    this.tickHostCalls = 0; // of hostCalls: made in timer ticks (and their HTTP calls' answers)
    this.trace = null; // host calls by name, when tracing
    this.calls = 0;
    this.named = new Map(); // pod -> calls named
    this.nextContext = 2;
    this.properties = new Map([
      ["xds\0cluster_name", "pods"],
      ["xds\0route_name", "unary"],
      ["xds\0node\0locality\0zone", "a"],
      ["upstream\0address", PODS[0]],
      ["source\0address", "127.0.0.1:50000"],
    ]);
    const module = new WebAssembly.Module(readFileSync(spec.wasm));
    const imports = { env: this.env(), wasi_snapshot_preview1: this.wasi() };
    const missing = WebAssembly.Module.imports(module)
      .filter((i) => !(i.name in imports[i.module]))
      .map((i) => `${i.module}.${i.name}`);
    if (missing.length) throw new Error(`${spec.name}: imports not provided: ${missing}`);
    this.instance = new WebAssembly.Instance(module, imports);
    this.x = this.instance.exports;
  }

  mem() {
    return new Uint8Array(this.x.memory.buffer);
  }
  dv() {
    return new DataView(this.x.memory.buffer);
  }
  str(ptr, len) {
    return dec.decode(this.mem().subarray(ptr, ptr + len));
  }
  // Copy bytes into VM memory (allocated by the VM) and return them through (ptr, size) out-params.
  give(bytes, retPtr, retSize) {
    const p = this.x.proxy_on_memory_allocate(bytes.length);
    this.mem().set(bytes, p);
    const dv = this.dv();
    dv.setUint32(retPtr, p, true);
    dv.setUint32(retSize, bytes.length, true);
    return OK;
  }
  map(type) {
    if (!this.maps.has(type)) this.maps.set(type, new HeaderMap());
    return this.maps.get(type);
  }

  env() {
    const vm = this;
    const env = {
      proxy_log: (level, ptr, len) => {
        if (level >= (process.env.VM_COST_LOG_LEVEL ?? 3)) vm.logs.push(`${level} ${vm.str(ptr, len)}`);
        return OK;
      },
      proxy_get_current_time_nanoseconds: (ret) => {
        vm.dv().setBigUint64(ret, vm.now, true);
        return OK;
      },
      proxy_set_tick_period_milliseconds: (ms) => {
        vm.tickPeriod = BigInt(ms) * 1_000_000n;
        return OK;
      },
      proxy_get_buffer_bytes: (type, start, max, retPtr, retSize) => {
        const b = vm.buffers.get(type);
        if (!b) return NOT_FOUND;
        return vm.give(b.subarray(start, start + max), retPtr, retSize);
      },
      proxy_get_header_map_value: (type, kp, kl, retPtr, retSize) => {
        const v = vm.map(type).get(vm.str(kp, kl));
        return v === undefined ? NOT_FOUND : vm.give(bytesOf(v), retPtr, retSize);
      },
      proxy_get_header_map_pairs: (type, retPtr, retSize) =>
        vm.give(vm.map(type).serialized(), retPtr, retSize),
      proxy_set_header_map_pairs: (type, p, l) => {
        vm.maps.set(type, new HeaderMap(parsePairs(vm.mem().slice(p, p + l))));
        return OK;
      },
      proxy_replace_header_map_value: (type, kp, kl, vp, vl) => {
        const k = vm.str(kp, kl), v = vm.str(vp, vl);
        vm.map(type).set(k, v);
        if (type === MAP.REQUEST && k === ENDPOINT_HEADER) {
          const pod = v.split(",")[0];
          vm.named.set(pod, (vm.named.get(pod) || 0) + 1);
        }
        return OK;
      },
      proxy_add_header_map_value: (type, kp, kl, vp, vl) => {
        vm.map(type).set(vm.str(kp, kl), vm.str(vp, vl));
        return OK;
      },
      proxy_remove_header_map_value: (type, kp, kl) => {
        vm.map(type).delete(vm.str(kp, kl));
        return OK;
      },
      proxy_get_property: (pp, pl, retPtr, retSize) => {
        const path = vm.str(pp, pl).replace(/\0+$/, "");
        const v = vm.properties.get(path);
        return v === undefined ? NOT_FOUND : vm.give(bytesOf(v), retPtr, retSize);
      },
      proxy_set_property: () => OK,
      proxy_get_shared_data: (kp, kl, retPtr, retSize, retCas) => {
        const e = vm.shared.get(vm.str(kp, kl));
        if (!e) return NOT_FOUND;
        vm.give(e.value, retPtr, retSize);
        vm.dv().setUint32(retCas, e.cas, true);
        return OK;
      },
      proxy_set_shared_data: (kp, kl, vp, vl, cas) => {
        const k = vm.str(kp, kl);
        const e = vm.shared.get(k);
        if (cas !== 0 && e && e.cas !== cas) return CAS_MISMATCH;
        vm.shared.set(k, { value: vm.mem().slice(vp, vp + vl), cas: e ? e.cas + 1 : 1 });
        return OK;
      },
      proxy_define_metric: (type, np, nl, retId) => {
        vm.metrics.push({ name: vm.str(np, nl), value: 0n });
        vm.dv().setUint32(retId, vm.metrics.length, true);
        return OK;
      },
      proxy_increment_metric: (id, delta) => {
        const m = vm.metrics[id - 1];
        if (!m) return NOT_FOUND;
        m.value += delta;
        return OK;
      },
      proxy_record_metric: (id, value) => {
        const m = vm.metrics[id - 1];
        if (!m) return NOT_FOUND;
        m.value = value;
        return OK;
      },
      proxy_get_metric: () => UNIMPLEMENTED,
      proxy_http_call: (up, ul, hp, hl, bp, bl, tp, tl, timeout, retToken) => {
        const token = vm.nextToken++;
        vm.pendingCalls.push([token, vm.str(up, ul), new Map(parsePairs(vm.mem().slice(hp, hp + hl)))]);
        vm.dv().setUint32(retToken, token, true);
        return OK;
      },
      proxy_send_local_response: () => OK,
      proxy_continue_stream: () => OK,
      proxy_close_stream: () => OK,
      proxy_set_buffer_bytes: () => OK,
      proxy_set_effective_context: () => OK,
      proxy_done: () => OK,
      proxy_get_status: () => UNIMPLEMENTED,
      proxy_call_foreign_function: () => UNIMPLEMENTED,
    };
    for (const name of [
      "proxy_grpc_cancel", "proxy_grpc_close", "proxy_grpc_send", "proxy_grpc_stream", "proxy_grpc_call",
      "proxy_dequeue_shared_queue", "proxy_enqueue_shared_queue", "proxy_resolve_shared_queue",
      "proxy_register_shared_queue",
    ]) {
      env[name] = () => UNIMPLEMENTED;
    }
    // Host calls counted (and traced with VM_COST_TRACE=1), all but the log and the context switch.
    for (const [name, f] of Object.entries(env)) {
      if (name === "proxy_log" || name === "proxy_set_effective_context") continue;
      env[name] = (...a) => {
        vm.hostCalls++;
        if (vm.trace) vm.trace.push(name.replace(/^proxy_/, ""));
        return f(...a);
      };
    }
    return env;
  }

  wasi() {
    const vm = this;
    return {
      random_get: (ptr, len) => {
        const m = vm.mem();
        for (let i = 0; i < len; i++) m[ptr + i] = (Math.random() * 256) | 0;
        return 0;
      },
      environ_sizes_get: (countPtr, sizePtr) => {
        vm.dv().setUint32(countPtr, 0, true);
        vm.dv().setUint32(sizePtr, 0, true);
        return 0;
      },
      environ_get: () => 0,
      fd_write: (fd, iovs, n, written) => {
        const dv = vm.dv();
        let total = 0;
        for (let i = 0; i < n; i++) total += dv.getUint32(iovs + 8 * i + 4, true);
        dv.setUint32(written, total, true);
        return 0;
      },
      proc_exit: (code) => {
        throw new Error(`${vm.spec.name}: proc_exit(${code})`);
      },
    };
  }

  start() {
    const x = this.x;
    if (x._initialize) x._initialize();
    x.proxy_on_context_create(1, 0);
    this.buffers.set(BUFFER.VM_CONFIGURATION, new Uint8Array());
    if (!x.proxy_on_vm_start(1, 0)) throw new Error(`${this.spec.name}: vm start refused`);
    const config = enc.encode(JSON.stringify(this.spec.config));
    this.buffers.set(BUFFER.PLUGIN_CONFIGURATION, config);
    if (!x.proxy_on_configure(1, config.length)) {
      throw new Error(`${this.spec.name}: configuration refused: ${this.logs.join("; ")}`);
    }
    // Time to take the discovery lease, poll the admin, read the snapshot and probe the pods.
    for (let i = 0; i < 8; i++) {
      this.now += this.tickPeriod;
      this.tick();
    }
  }

  // A timer tick, then every HTTP call it dispatched answered: the admin poll with the pods,
  // a probe with a load report.
  tick() {
    if (this.tickPeriod === 0n) return;
    const calls0 = this.hostCalls;
    this.x.proxy_on_tick(1);
    const calls = this.pendingCalls.splice(0);
    for (const [token, upstream, headers] of calls) {
      const body = enc.encode(upstream === "pods" ? "" : adminClusters());
      const response = new HeaderMap([[":status", "200"]]);
      this.maps.set(MAP.HTTP_CALL_RESPONSE, response);
      if (upstream === "pods") {
        response.set("endpoint-load-metrics", "TEXT application_utilization=0.3, rps_fractional=300, named_metrics.streams=4");
      }
      this.buffers.set(BUFFER.HTTP_CALL_RESPONSE_BODY, body);
      this.x.proxy_on_http_call_response(1, token, response.size, body.length, 0);
    }
    this.nextTick = this.now + this.tickPeriod;
    this.tickHostCalls += this.hostCalls - calls0;
  }

  // One unary gRPC call, as Envoy drives a filter through it.
  call() {
    const x = this.x, id = this.nextContext++;
    this.calls++;
    this.now += CALL_NS;
    if (this.tickPeriod && this.now >= this.nextTick) this.tick();
    x.proxy_on_context_create(id, 1);
    const req = this.map(MAP.REQUEST);
    req.copy(REQUEST_HEADERS);
    x.proxy_on_request_headers(id, req.size, 0);
    this.buffers.set(BUFFER.REQUEST_BODY, REQUEST_BODY);
    x.proxy_on_request_body(id, REQUEST_BODY.length, 1);
    const resp = this.map(MAP.RESPONSE);
    resp.copy(RESPONSE_HEADERS);
    x.proxy_on_response_headers(id, resp.size, 0);
    this.buffers.set(BUFFER.RESPONSE_BODY, RESPONSE_BODY);
    x.proxy_on_response_body(id, RESPONSE_BODY.length, 0);
    const trailers = this.map(MAP.RESPONSE_TRAILERS);
    trailers.copy(RESPONSE_TRAILERS);
    this.now += CALL_NS / 2n;
    x.proxy_on_response_trailers(id, trailers.size);
    x.proxy_on_done(id);
    x.proxy_on_log(id);
    x.proxy_on_delete(id);
  }
}

const REQUEST_HEADERS = new HeaderMap([
  [":method", "POST"], [":scheme", "http"], [":path", "/streamlb.lab.v1.Telemetry/Send"],
  [":authority", "127.0.0.1:10000"], ["content-type", "application/grpc"], ["te", "trailers"],
  ["user-agent", "h2load nghttp2/1.64.0"],
]);
const RESPONSE_HEADERS = new HeaderMap([[":status", "200"], ["content-type", "application/grpc"]]);
const RESPONSE_TRAILERS = new HeaderMap([["grpc-status", "0"]]);
const REQUEST_BODY = grpcMessage(32);
const RESPONSE_BODY = grpcMessage(2);

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}
const fmt = (x) => x.toFixed(2);
const range = (xs) => `${fmt(median(xs))} [${fmt(Math.min(...xs))}–${fmt(Math.max(...xs))}]`;

const vms = modules.map((m) => new Vm(m));
for (const vm of vms) {
  vm.start();
  for (let i = 0; i < WARMUP; i++) vm.call();
  // One call traced: its host calls by name, in order.
  vm.trace = [];
  vm.call();
  vm.oneCall = vm.trace;
  vm.trace = null;
  if (process.env.VM_COST_TRACE) console.error(`${vm.spec.name}: ${vm.oneCall.join(" ")}`);
}
const perCall = new Map(modules.map((m) => [m.name, []]));
const hostCallsPerCall = new Map();
for (let r = 0; r < ROUNDS; r++) {
  for (let k = 0; k < vms.length; k++) {
    const vm = vms[(k + r) % vms.length];
    const calls0 = vm.hostCalls - vm.tickHostCalls;
    const t0 = performance.now();
    for (let i = 0; i < CALLS; i++) vm.call();
    const us = ((performance.now() - t0) * 1000) / CALLS;
    perCall.get(vm.spec.name).push(us);
    hostCallsPerCall.set(vm.spec.name, (vm.hostCalls - vm.tickHostCalls - calls0) / CALLS);
  }
}

// Checks: streamlb named a pod on every call, over both pods; nobody logged an error.
const failures = [];
for (const vm of vms) {
  const total = vm.calls;
  const named = [...vm.named.values()].reduce((a, b) => a + b, 0);
  if (vm.spec.steers && (named !== total || vm.named.size !== PODS.length)) {
    failures.push(`${vm.spec.name}: named a pod on ${named} of ${total} calls, over ${vm.named.size} pods`);
  }
  const errors = vm.logs.filter((l) => l.startsWith("4") || l.startsWith("5"));
  if (errors.length) failures.push(`${vm.spec.name}: logged errors: ${errors.slice(0, 3).join(" | ")}`);
}

// The subtraction's premise: the floor makes exactly streamlb's host calls, in the same order.
const byName = new Map(vms.map((vm) => [vm.spec.name, vm]));
const [own, floorCalls] = [byName.get("streamlb"), byName.get("floor_streamlb_calls")];
if (own && floorCalls && own.oneCall.join(" ") !== floorCalls.oneCall.join(" ")) {
  failures.push(`floor_streamlb_calls makes [${floorCalls.oneCall}] per call, streamlb [${own.oneCall}]: ` +
    "streamlb − floor_streamlb_calls is not streamlb's own work (bench/floor/src/lib.rs)");
}

const rows = modules.map((m) => ({
  module: m.name,
  us_per_call: perCall.get(m.name),
  host_calls_per_call: hostCallsPerCall.get(m.name),
  host_calls_of_one_call: byName.get(m.name).oneCall,
}));
const diff = (a, b) => perCall.get(a).map((x, i) => x - perCall.get(b)[i]);
const pairs = [
  ["streamlb", "floor_streamlb_calls"],
  ["streamlb", "floor_bodies"],
  ["floor_streamlb_calls", "floor_bodies"],
  ["streamlb", "streamlb_baseline"],
].filter(([a, b]) => perCall.has(a) && perCall.has(b));
console.log(`V8 ${process.versions.v8} (Node.js ${process.version}); ${ROUNDS} rounds × ${CALLS} calls, order rotated\n`);
console.log("| module | µs per unary call median [min–max] | host calls per call (ticks apart) |");
console.log("|---|---|---|");
for (const r of rows) console.log(`| ${r.module} | ${range(r.us_per_call)} | ${r.host_calls_per_call.toFixed(2)} |`);
const sd = (xs) => {
  const m = xs.reduce((a, b) => a + b, 0) / xs.length;
  return Math.sqrt(xs.reduce((a, x) => a + (x - m) ** 2, 0) / Math.max(1, xs.length - 1));
};
console.log("\n| paired difference | µs per call median [min–max] | sd | rounds below 0 |");
console.log("|---|---|---|---|");
for (const [a, b] of pairs) {
  const d = diff(a, b);
  console.log(`| ${a} − ${b} | ${range(d)} | ${fmt(sd(d))} | ${d.filter((x) => x < 0).length} of ${d.length} |`);
}
if (arg("json")) {
  writeFileSync(arg("json"), JSON.stringify({
    v8: process.versions.v8, rounds: ROUNDS, calls: CALLS, modules: rows,
    differences: Object.fromEntries(pairs.map(([a, b]) => [`${a} - ${b}`, diff(a, b)])),
    named: Object.fromEntries(vms.map((vm) => [vm.spec.name, Object.fromEntries(vm.named)])),
    failures,
  }, null, 1));
}
if (process.env.VM_COST_LOG_LEVEL) for (const vm of vms) console.error(vm.spec.name, vm.logs.slice(0, 20));
if (failures.length) {
  console.error(failures.join("\n"));
  process.exit(1);
}
