-- The etcd way to register an instance: put its JSON description under a service prefix.
local n = 0
local threads = 0
local b64 = dofile("bench/lua/b64.lua")
function setup(thread) thread:set("tid", threads); threads = threads + 1 end
function request()
  n = n + 1
  local id = "reg-t" .. tid .. "-" .. n
  local value = '{"Name":"bench-reg","ID":"' .. id .. '","Address":"10.0.' .. (n % 250) .. '.' .. (tid + 1) ..
    '","Port":8080,"Tags":["v1"],"Meta":{"zone":"a"},"Check":{"TTL":"60s"}}'
  local body = '{"key":"' .. b64("services/bench-reg/" .. id) .. '","value":"' .. b64(value) .. '"}'
  return wrk.format("POST", "/v3/kv/put", { ["Content-Type"] = "application/json" }, body)
end
