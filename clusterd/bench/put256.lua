-- wrk script: etcd v2 PUT of 256-byte values over 1000 keys (form-encoded, like curl -d value=...).
local counter = 0
local value = string.rep("x", 256)
request = function()
  counter = counter + 1
  return wrk.format("PUT", "/v2/keys/bench/k" .. (counter % 1000),
    { ["Content-Type"] = "application/x-www-form-urlencoded" }, "value=" .. value)
end
