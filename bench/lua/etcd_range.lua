-- Read every instance of a service: a prefix range over services/web/ (etcd v3 gateway).
-- key = "services/web/", range_end = "services/web0" ('/' + 1 = '0').
local body = '{"key":"c2VydmljZXMvd2ViLw==","range_end":"c2VydmljZXMvd2ViMA=="}'
function request()
  return wrk.format("POST", "/v3/kv/range", { ["Content-Type"] = "application/json" }, body)
end
