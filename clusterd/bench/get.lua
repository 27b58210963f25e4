-- wrk script: linearizable etcd v2 GET of one key.
request = function()
  return wrk.format("GET", "/v2/keys/bench/k1", nil, nil)
end
