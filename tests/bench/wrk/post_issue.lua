-- wrk script for the benchmarks: POST a JSON body with a user id per request.
--
-- Environment (read once per thread):
--   BENCH_PATH       request path, e.g. /v1/coupons/7/issues
--   BENCH_BODY       body template with one %d for the user id, e.g. {"user_id":%d}
--   BENCH_UID_MIN / BENCH_UID_MAX   user ids are drawn uniformly from this range
--
-- done() prints one line "BENCH_STATUS <json>" with the count of each HTTP status, so the
-- caller can check the scenario answered what it claims to measure (202s, 409s, ...), and
-- under "success" the 200s whose body says "isSuccess":true (the seed's routes).

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_index", thread_count)
  table.insert(threads, thread)
end

local path, template, uid_min, uid_max
statuses = {}

function init(args)
  path = os.getenv("BENCH_PATH") or "/"
  template = os.getenv("BENCH_BODY") or '{"user_id":%d}'
  uid_min = tonumber(os.getenv("BENCH_UID_MIN") or "1")
  uid_max = tonumber(os.getenv("BENCH_UID_MAX") or "1000000000")
  math.randomseed(os.time() * 1000 + thread_index)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  local uid = math.random(uid_min, uid_max)
  return wrk.format(nil, path, nil, string.format(template, uid))
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  -- The seed's routes answer 200 either way; the body tells a success from a refusal.
  if status == 200 and body and string.find(body, '"isSuccess":true', 1, true) then
    statuses["success"] = (statuses["success"] or 0) + 1
  end
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    local counts = thread:get("statuses")
    for status, n in pairs(counts) do
      total[status] = (total[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(total) do
    table.insert(parts, string.format('"%s":%d', tostring(status), n))
  end
  io.write("BENCH_STATUS {" .. table.concat(parts, ",") .. "}\n")
  io.write(string.format(
    'BENCH_SUMMARY {"requests":%d,"duration_us":%d,"errors_connect":%d,"errors_read":%d,'
      .. '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
