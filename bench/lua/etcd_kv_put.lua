-- KV puts with a distinct key per request: etcd v3 JSON gateway (keys/values base64).
local n = 0
local threads = 0
local b64 = dofile("bench/lua/b64.lua")
function setup(thread) thread:set("tid", threads); threads = threads + 1 end
function request()
  n = n + 1
  local body = '{"key":"' .. b64("bench/t" .. tid .. "/k" .. n) .. '","value":"' .. b64("value-" .. n) .. '"}'
  return wrk.format("POST", "/v3/kv/put", { ["Content-Type"] = "application/json" }, body)
end
