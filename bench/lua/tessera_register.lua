-- Service registrations (agent API) with a TTL check, one new instance per request.
local n = 0
local threads = 0
function setup(thread) thread:set("tid", threads); threads = threads + 1 end
function request()
  n = n + 1
  local id = "reg-t" .. tid .. "-" .. n
  local body = '{"Name":"bench-reg","ID":"' .. id .. '","Address":"10.0.' .. (n % 250) .. '.' .. (tid + 1) ..
    '","Port":8080,"Tags":["v1"],"Meta":{"zone":"a"},"Check":{"TTL":"60s"}}'
  return wrk.format("PUT", "/v1/agent/service/register", { ["Content-Type"] = "application/json" }, body)
end
