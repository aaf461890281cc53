-- wrk script that cycles through the request paths listed in the file WRK_PATHS (one per
-- line), each thread from its own offset, with WRK_ACCEPT as the Accept header. Every
-- status but 200 is counted and reported by done().
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  paths = {}
  for line in io.lines(os.getenv("WRK_PATHS")) do
    if line ~= "" then table.insert(paths, line) end
  end
  n = (id * 7919) % #paths
  bad = 0
  local accept = os.getenv("WRK_ACCEPT")
  if accept ~= nil and accept ~= "" then wrk.headers["Accept"] = accept end
end

function request()
  n = n % #paths + 1
  return wrk.format("GET", paths[n])
end

function response(status, headers, body)
  if status ~= 200 then bad = bad + 1 end
end

function done(summary, latency, requests)
  local failed = 0
  for _, t in ipairs(threads) do failed = failed + t:get("bad") end
  io.write(string.format("WRKJSON {\"rps\": %.1f, \"p50_us\": %d, \"p99_us\": %d, \"non_200\": %d}\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50), latency:percentile(99), failed))
end
