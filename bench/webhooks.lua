-- wrk script of bench/webhooks.py: POSTs pre-signed webhooks, each thread its own share of them.
-- BENCH_REQUESTS names a file of "webhook-id TAB timestamp TAB signature TAB body" lines. A thread
-- that has sent all of its share starts over: those repeats are answered 200 (duplicates).
-- done() prints one "BENCH {json}" line: statuses, socket errors, duration and latency percentiles.

local threads = {}
local counter = 0

function setup(thread)
   thread:set("index", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

function init(args)
   statuses = {}
   prepared = {}
   local mine = 0
   for line in io.lines(os.getenv("BENCH_REQUESTS")) do
      if mine % counter_total() == index then
         local id, timestamp, signature, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
         prepared[#prepared + 1] = wrk.format("POST", nil, {
            ["Content-Type"] = "application/json",
            ["webhook-id"] = id,
            ["webhook-timestamp"] = timestamp,
            ["webhook-signature"] = signature,
         }, body)
      end
      mine = mine + 1
   end
   next_request = 0
end

function counter_total()
   return tonumber(os.getenv("BENCH_THREADS"))
end

function request()
   next_request = next_request % #prepared + 1
   return prepared[next_request]
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
   local totals = {}
   for _, thread in ipairs(threads) do
      for status, count in pairs(thread:get("statuses")) do
         totals[tostring(status)] = (totals[tostring(status)] or 0) + count
      end
   end
   local parts = {}
   for status, count in pairs(totals) do
      parts[#parts + 1] = string.format('"%s": %d', status, count)
   end
   local errors = summary.errors.connect + summary.errors.read + summary.errors.write
      + summary.errors.timeout
   io.write(string.format(
      'BENCH {"statuses": {%s}, "errors": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d}\n',
      table.concat(parts, ", "), errors, summary.duration, latency:percentile(50), latency:percentile(99)))
end
