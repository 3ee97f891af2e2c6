-- etcd driven directly with the shape of one tessera KV put: a transaction that compares
-- the key's mod revision and puts the key and the registry's marker key (JSON gateway).
local n = 0
local threads = 0
local b64 = dofile("bench/lua/b64.lua")
function setup(thread) thread:set("tid", threads); threads = threads + 1 end
function request()
  n = n + 1
  local k = b64("bench/t" .. tid .. "/k" .. n)
  local body = '{"compare":[{"target":"MOD","result":"EQUAL","key":"' .. k .. '","mod_revision":"0"}],'
    .. '"success":[{"request_put":{"key":"' .. k .. '","value":"' .. b64("value-" .. n) .. '"}},'
    .. '{"request_put":{"key":"' .. b64("bench-marker") .. '","value":""}}]}'
  return wrk.format("POST", "/v3/kv/txn", { ["Content-Type"] = "application/json" }, body)
end
