-- wrk script for bench/: POST pre-made form bodies from a file and check every answer.
--
-- Usage: wrk ... -s bench/load.lua URL -- REQUESTS.tsv
-- Each line of REQUESTS.tsv: request_id TAB kind TAB status TAB needle TAB form-body.
-- The request id travels as X-Request-Id and comes back in the response (both servers echo it), so
-- each answer is matched to the request that caused it even with many connections per thread.
-- An answer is correct when its status is the expected one and the body holds the needle
-- (e.g. "invalid_target" for a policy deny): a refused request refused correctly is not an error.
-- A server that does not echo X-Request-Id (Keycloak) is run with a second argument, "by-outcome":
-- an answer then counts for the first kind whose status and needle it matches, and the script also
-- reports how many requests of each kind it sent, so the caller can check the counts against each other.

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  local path = args[1]
  by_outcome = args[2] == "by-outcome"
  requests = {}
  kinds_of = {}
  expected = {}
  outcomes = {}
  local seen_outcome = {}
  for line in io.lines(path) do
    local id, kind, status, needle, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
    if id then
      local headers = {}
      headers["Content-Type"] = "application/x-www-form-urlencoded"
      headers["X-Request-Id"] = id
      table.insert(requests, wrk.format("POST", nil, headers, body))
      expected[id] = { kind = kind, status = tonumber(status), needle = needle }
      table.insert(kinds_of, kind)
      local key = status .. "\t" .. needle
      if not seen_outcome[key] then
        seen_outcome[key] = true
        table.insert(outcomes, expected[id])
      end
    end
  end
  count = #requests
  position = (tid * 7919) % count
  correct = {}
  sent = {}
  wrong = 0
  unmatched = 0
  wrong_sample = ""
end

function request()
  position = position % count + 1
  local kind = kinds_of[position]
  sent[kind] = (sent[kind] or 0) + 1
  return requests[position]
end

local function header(headers, name)
  local value = headers[name]
  if value then return value end
  local lower = string.lower(name)
  for key, v in pairs(headers) do
    if string.lower(key) == lower then return v end
  end
  return nil
end

local function by_status_and_body(status, body)
  for _, want in ipairs(outcomes) do
    if status == want.status and string.find(body, want.needle, 1, true) then return want end
  end
  return nil
end

function response(status, headers, body)
  local id = header(headers, "X-Request-Id")
  local want = id and expected[id]
  if by_outcome and not want then
    want = by_status_and_body(status, body) or { kind = "", status = -1, needle = "" }
  end
  if not want then
    unmatched = unmatched + 1
    if wrong_sample == "" then wrong_sample = "unmatched " .. status .. " " .. string.sub(body, 1, 200) end
    return
  end
  if status == want.status and string.find(body, want.needle, 1, true) then
    correct[want.kind] = (correct[want.kind] or 0) + 1
  else
    wrong = wrong + 1
    if wrong_sample == "" then
      wrong_sample = want.kind .. " got " .. status .. " " .. string.sub(body, 1, 200)
    end
  end
end

local function quote(text)
  return '"' .. string.gsub(string.gsub(text, '[%c"\\]', " "), "%s+", " ") .. '"'
end

function done(summary, latency, requests)
  local totals = {}
  local sent_totals = {}
  local wrong_total, unmatched_total, sample = 0, 0, ""
  for _, thread in ipairs(threads) do
    local c = thread:get("correct")
    for kind, n in pairs(c) do totals[kind] = (totals[kind] or 0) + n end
    for kind, n in pairs(thread:get("sent")) do sent_totals[kind] = (sent_totals[kind] or 0) + n end
    wrong_total = wrong_total + thread:get("wrong")
    unmatched_total = unmatched_total + thread:get("unmatched")
    if sample == "" then sample = thread:get("wrong_sample") end
  end
  local kinds = {}
  for kind, n in pairs(totals) do table.insert(kinds, string.format("%s:%d", quote(kind), n)) end
  local sent_kinds = {}
  for kind, n in pairs(sent_totals) do table.insert(sent_kinds, string.format("%s:%d", quote(kind), n)) end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"duration_us":%d,"requests":%d,"correct":{%s},"sent":{%s},"wrong":%d,"unmatched":%d,' ..
    '"socket_errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},"status_errors":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,"wrong_sample":%s}\n',
    summary.duration, summary.requests, table.concat(kinds, ","), table.concat(sent_kinds, ","), wrong_total, unmatched_total,
    e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    quote(sample)))
end
