-- KV puts with a distinct key per request: tessera's Consul KV API.
local n = 0
local threads = 0
function setup(thread) thread:set("tid", threads); threads = threads + 1 end
function request()
  n = n + 1
  return wrk.format("PUT", "/v1/kv/bench/t" .. tid .. "/k" .. n, nil, "value-" .. n)
end
